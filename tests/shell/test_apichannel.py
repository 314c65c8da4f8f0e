"""ApiClient: DispatchApiClient's auth and signing, plus extra channel options."""

from __future__ import annotations

from pathlib import Path

import grpc
import grpc.aio
import pytest
from frequenz.api.dispatch.v1.dispatch_pb2 import ListMicrogridDispatchesRequest

from dispatchd.apichannel import ApiClient
from dispatchd.localapi import LocalApiServer


async def test_signed_and_authenticated_calls_pass(tmp_path: Path) -> None:
    api = LocalApiServer(
        listen="127.0.0.1:0", database=tmp_path / "d.sqlite3", auth_keys=["k"], sign_secret="s"
    )
    port = await api.start()
    url = f"grpc://127.0.0.1:{port}?ssl=false"
    request = ListMicrogridDispatchesRequest(microgrid_id=1)
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    good = ApiClient(server_url=url, auth_key="k", sign_secret="s", channel_options=options)
    unsigned = ApiClient(server_url=url, auth_key="k", channel_options=options)
    try:
        response = await good.stub.ListMicrogridDispatches(request, timeout=10)
        assert list(response.dispatches) == []
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await unsigned.stub.ListMicrogridDispatches(request, timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await good.disconnect()
        await unsigned.disconnect()
        await api.stop(0)


def test_urls_are_checked_like_the_official_client() -> None:
    with pytest.raises(ValueError, match="grpc://"):
        ApiClient(server_url="http://127.0.0.1:1", auth_key="k")
    with pytest.raises(ValueError):
        ApiClient(server_url="grpc://127.0.0.1:1?unknown=1", auth_key="k")

"""Server lifecycle: binding errors and what open streams see on shutdown."""

from __future__ import annotations

import asyncio
import pathlib
import socket

import grpc
import pytest
import structlog.testing
from frequenz.api.dispatch.v1 import dispatch_pb2_grpc
from frequenz.api.dispatch.v1.dispatch_pb2 import StreamMicrogridDispatchesRequest

from dispatchd.localapi import LocalApiServer


async def test_port_in_use_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    first = LocalApiServer(listen="127.0.0.1:0", database=tmp_path / "a.sqlite3")
    port = await first.start()
    try:
        second = LocalApiServer(listen=f"127.0.0.1:{port}", database=tmp_path / "b.sqlite3")
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            await second.start()
    finally:
        await first.stop(0)


async def test_stop_ends_streams_with_unavailable_so_clients_retry(tmp_path: pathlib.Path) -> None:
    api = LocalApiServer(listen="127.0.0.1:0", database=tmp_path / "s.sqlite3")
    port = await api.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = dispatch_pb2_grpc.MicrogridDispatchServiceStub(channel)
        call = stub.StreamMicrogridDispatches(StreamMicrogridDispatchesRequest(microgrid_id=1))
        await asyncio.wait_for(api.broadcaster.wait_for_subscribers(1, 1), 5)
        await api.stop(1)
        await asyncio.wait_for(api.wait_closed(), 5)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await asyncio.wait_for(call.read(), 5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_invalid_stream_request(tmp_path: pathlib.Path) -> None:
    api = LocalApiServer(listen="127.0.0.1:0", database=tmp_path / "o.sqlite3")
    port = await api.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = dispatch_pb2_grpc.MicrogridDispatchServiceStub(channel)
            bad = stub.StreamMicrogridDispatches(StreamMicrogridDispatchesRequest(microgrid_id=0))
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await asyncio.wait_for(bad.read(), 5)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "microgrid_id" in (error.value.details() or "")
    finally:
        await api.stop(0)


async def test_a_taken_port_says_why_in_the_words_of_the_operating_system(
    tmp_path: pathlib.Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = LocalApiServer(listen=f"127.0.0.1:{port}", database=tmp_path / "a.sqlite3")
        with pytest.raises(OSError, match="Address already in use") as error:
            await server.start()
    assert "GRPC_VERBOSITY" not in str(error.value)


@pytest.mark.parametrize(
    ("listen", "auth_keys", "warned"),
    [
        ("0.0.0.0:0", [], True),
        ("[::]:0", [], True),
        ("0.0.0.0:0", ["k"], False),
        ("127.0.0.1:0", [], False),
        ("localhost:0", [], False),
        ("[::1]:0", [], False),
    ],
)
async def test_open_to_other_hosts_without_a_key_is_a_warning(
    tmp_path: pathlib.Path, listen: str, auth_keys: list[str], warned: bool
) -> None:
    server = LocalApiServer(listen=listen, database=tmp_path / "w.sqlite3", auth_keys=auth_keys)
    with structlog.testing.capture_logs() as logs:
        await server.start()
    await server.stop(0)
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert bool(warnings) == warned, logs
    if warned:
        assert "api.local.auth_keys" in warnings[0]["event"]
        assert warnings[0]["listen"] == listen

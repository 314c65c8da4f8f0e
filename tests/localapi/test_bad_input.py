"""Bad input gets INVALID_ARGUMENT with a reason, never INTERNAL plus a traceback.

Each request goes through a real gRPC channel to the real local API server.
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import grpc.aio
import pytest
from frequenz.api.common.v1alpha8.pagination.pagination_params_pb2 import PaginationParams
from frequenz.api.dispatch.v1 import dispatch_pb2_grpc
from frequenz.api.dispatch.v1.dispatch_pb2 import (
    CreateMicrogridDispatchRequest,
    DispatchData,
    DispatchFilter,
    ListMicrogridDispatchesRequest,
    TargetComponents,
)

from dispatchd.localapi import LocalApiServer

LIST = "/frequenz.api.dispatch.v1.MicrogridDispatchService/ListMicrogridDispatches"


@pytest.fixture(params=[False, True], ids=["open", "with-auth"])
async def port(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[int]:
    keys = ["secret"] if request.param else []
    api = LocalApiServer(listen="127.0.0.1:0", database=tmp_path / "d.sqlite3", auth_keys=keys)
    yield await api.start()
    await api.stop(0)


@pytest.fixture
async def channel(port: int) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as opened:
        yield opened


METADATA = (("key", "secret"),)


async def invalid_argument(call: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    return raised.value.details() or ""


def target(component: int) -> TargetComponents:
    return TargetComponents(component_ids=TargetComponents.IdSet(ids=[component]))


async def test_component_id_beyond_sqlite_integers(channel: grpc.aio.Channel) -> None:
    stub = dispatch_pb2_grpc.MicrogridDispatchServiceStub(channel)
    start = datetime.now(UTC) + timedelta(hours=1)
    data = DispatchData(type="T", duration=60, target=target(2**64 - 1))
    data.start_time.FromDatetime(start)
    create = CreateMicrogridDispatchRequest(microgrid_id=1, dispatch_data=data)
    assert "component" in await invalid_argument(
        stub.CreateMicrogridDispatch(create, metadata=METADATA)
    )
    listing = ListMicrogridDispatchesRequest(
        microgrid_id=1, filter=DispatchFilter(targets=[target(2**64 - 1)])
    )
    assert "component" in await invalid_argument(
        stub.ListMicrogridDispatches(listing, metadata=METADATA)
    )


@pytest.mark.parametrize("field", ["queries", "targets", "dispatch_ids"])
async def test_a_thousand_filter_items_are_answered(channel: grpc.aio.Channel, field: str) -> None:
    """1000 items (the documented maximum) work; SQLite's expression depth is no limit."""
    stub = dispatch_pb2_grpc.MicrogridDispatchServiceStub(channel)
    items: dict[str, list[object]] = {
        "queries": [f"type{n}" for n in range(1000)],
        "targets": [target(n + 1) for n in range(1000)],
        "dispatch_ids": list(range(1, 1001)),
    }
    request = ListMicrogridDispatchesRequest(
        microgrid_id=1, filter=DispatchFilter(**{field: items[field]})
    )
    response = await stub.ListMicrogridDispatches(request, metadata=METADATA)
    assert list(response.dispatches) == []
    too_many = ListMicrogridDispatchesRequest(
        microgrid_id=1, filter=DispatchFilter(**{field: items[field] * 2})
    )
    assert field in await invalid_argument(
        stub.ListMicrogridDispatches(too_many, metadata=METADATA)
    )


async def test_forged_page_token_of_brackets(channel: grpc.aio.Channel) -> None:
    import base64

    stub = dispatch_pb2_grpc.MicrogridDispatchServiceStub(channel)
    for token in ("[" * 100_000, base64.urlsafe_b64encode(b"[" * 100_000).decode()):
        request = ListMicrogridDispatchesRequest(
            microgrid_id=1, pagination_params=PaginationParams(page_token=token)
        )
        assert "page_token" in await invalid_argument(
            stub.ListMicrogridDispatches(request, metadata=METADATA)
        )


@pytest.mark.parametrize("metadata", [METADATA, ()], ids=["with-key", "no-key"])
async def test_undecodable_request(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
) -> None:
    """Bytes protobuf cannot parse (a truncated field), with and without a key."""
    raw = channel.unary_unary(LIST)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await raw(b"\x0a\xff\xff", metadata=metadata)
    assert raised.value.code() in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
    ), raised.value.details()
    if metadata:
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT

"""What one dispatch may hold, and List pages that stay under gRPC's 4 MiB limit.

Through a real gRPC channel (with gRPC's default receive limit, like any
client) against the real local API server.
"""

from __future__ import annotations

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
    ListMicrogridDispatchesRequest,
    RecurrenceRule,
    TargetComponents,
)

from dispatchd.localapi import LocalApiServer
from dispatchd.localapi.storage import PAGE_BYTES
from dispatchd.localapi.validation import MAX_DISPATCH_BYTES, MAX_TARGET_ITEMS

GRPC_DEFAULT_LIMIT = 4 * 1024 * 1024
BIG_ID = 2**50


@pytest.fixture
async def stub(
    server: tuple[LocalApiServer, int],
) -> AsyncIterator[dispatch_pb2_grpc.MicrogridDispatchServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server[1]}") as channel:
        yield dispatch_pb2_grpc.MicrogridDispatchServiceStub(channel)


def data(ids: range, payload_chars: int = 0, **fields: object) -> DispatchData:
    result = DispatchData(
        type="T",
        duration=60,
        target=TargetComponents(component_ids=TargetComponents.IdSet(ids=ids)),
        **fields,  # type: ignore[arg-type]
    )
    result.start_time.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    if payload_chars:
        result.payload.update({"blob": "x" * payload_chars})
    return result


async def create(stub: dispatch_pb2_grpc.MicrogridDispatchServiceStub, body: DispatchData) -> int:
    response = await stub.CreateMicrogridDispatch(
        CreateMicrogridDispatchRequest(microgrid_id=1, dispatch_data=body)
    )
    return int(response.dispatch.metadata.dispatch_id)


async def rejected(stub: dispatch_pb2_grpc.MicrogridDispatchServiceStub, body: DispatchData) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await create(stub, body)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return raised.value.details() or ""


async def test_target_ids_are_capped(stub: dispatch_pb2_grpc.MicrogridDispatchServiceStub) -> None:
    await create(stub, data(range(1, MAX_TARGET_ITEMS + 1)))
    details = await rejected(stub, data(range(1, MAX_TARGET_ITEMS + 2)))
    assert "component_ids" in details and str(MAX_TARGET_ITEMS) in details


async def test_serialised_size_is_capped(
    stub: dispatch_pb2_grpc.MicrogridDispatchServiceStub,
) -> None:
    body = data(range(2**62, 2**62 + MAX_TARGET_ITEMS), payload_chars=48_000)
    assert body.ByteSize() > MAX_DISPATCH_BYTES
    assert "dispatch_data" in await rejected(stub, body)


async def test_by_lists_keep_each_value_once(
    stub: dispatch_pb2_grpc.MicrogridDispatchServiceStub,
) -> None:
    rule = RecurrenceRule(
        freq=RecurrenceRule.FREQUENCY_DAILY,
        interval=1,
        byminutes=[5, 7, 5] * 1000,
        byhours=[3] * 500,
        bymonths=[2, 1, 2],
    )
    response = await stub.CreateMicrogridDispatch(
        CreateMicrogridDispatchRequest(
            microgrid_id=1, dispatch_data=data(range(1, 2), recurrence=rule)
        )
    )
    stored = response.dispatch.data.recurrence
    assert (list(stored.byminutes), list(stored.byhours), list(stored.bymonths)) == (
        [5, 7],
        [3],
        [2, 1],
    )


async def test_list_pages_stay_under_the_grpc_limit(
    stub: dispatch_pb2_grpc.MicrogridDispatchServiceStub,
) -> None:
    body = data(range(BIG_ID, BIG_ID + MAX_TARGET_ITEMS), payload_chars=40_000)
    assert body.ByteSize() <= MAX_DISPATCH_BYTES
    created = {await create(stub, body) for _ in range(40)}
    assert len(created) * body.ByteSize() > GRPC_DEFAULT_LIMIT
    listed: list[int] = []
    pages = 0
    request = ListMicrogridDispatchesRequest(
        microgrid_id=1, pagination_params=PaginationParams(page_size=1000)
    )
    while True:
        page = await stub.ListMicrogridDispatches(request)
        pages += 1
        assert page.ByteSize() <= PAGE_BYTES + body.ByteSize() < GRPC_DEFAULT_LIMIT
        listed += [d.metadata.dispatch_id for d in page.dispatches]
        if not page.pagination_info.next_page_token:
            break
        request.pagination_params.CopyFrom(
            PaginationParams(page_token=page.pagination_info.next_page_token)
        )
    assert pages >= 2
    assert sorted(listed) == sorted(created)

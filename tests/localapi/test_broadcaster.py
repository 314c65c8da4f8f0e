"""The per-microgrid fan-out: ordering, isolation and the slow-subscriber cut-off."""

from __future__ import annotations

import asyncio

import pytest
from frequenz.api.dispatch.v1.dispatch_pb2 import (
    Dispatch,
    DispatchMetadata,
    StreamMicrogridDispatchesResponse,
)

from dispatchd.localapi.broadcaster import Broadcaster, Overflowed


def event(dispatch_id: int) -> StreamMicrogridDispatchesResponse:
    return StreamMicrogridDispatchesResponse(
        dispatch=Dispatch(metadata=DispatchMetadata(dispatch_id=dispatch_id)), event=1
    )


def ids(events: list[StreamMicrogridDispatchesResponse | None]) -> list[int]:
    return [e.dispatch.metadata.dispatch_id for e in events if e is not None]


async def test_order_and_microgrid_isolation() -> None:
    broadcaster = Broadcaster()
    mine, also_mine = broadcaster.subscribe(1), broadcaster.subscribe(1)
    other = broadcaster.subscribe(2)
    for n in range(5):
        broadcaster.publish(1, event(n))
    broadcaster.publish(2, event(99))
    for subscription in (mine, also_mine):
        assert ids([await subscription.next() for _ in range(5)]) == [0, 1, 2, 3, 4]
    assert ids([await other.next()]) == [99]


async def test_slow_subscriber_is_cut_off_without_blocking_others() -> None:
    broadcaster = Broadcaster(buffer_size=3)
    slow, fast = broadcaster.subscribe(1), broadcaster.subscribe(1)
    received: list[int] = []
    for n in range(10):
        broadcaster.publish(1, event(n))
        received += ids([await fast.next()])
    assert received == list(range(10))
    with pytest.raises(Overflowed):
        await slow.next()


async def test_waiting_for_subscribers_and_closing() -> None:
    broadcaster = Broadcaster()
    waiting = asyncio.create_task(broadcaster.wait_for_subscribers(5, 2))
    first = broadcaster.subscribe(5)
    assert not waiting.done()
    second = broadcaster.subscribe(5)
    await asyncio.wait_for(waiting, 1)
    await asyncio.wait_for(broadcaster.wait_for_subscribers(5, 1), 1)
    pending = asyncio.create_task(first.next())
    broadcaster.close_all()
    assert await asyncio.wait_for(pending, 1) is None
    assert await second.next() is None
    broadcaster.unsubscribe(5, first)
    broadcaster.unsubscribe(5, second)
    broadcaster.unsubscribe(5, second)
    assert broadcaster.subscriber_count(5) == 0

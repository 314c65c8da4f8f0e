"""ApiSync against a server that sends a stream's headers only with its first event.

No wait for headers that may never come before the first listing, and no
change lost between that listing and the server registering the stream: it
lists again once the stream is confirmed (its first event) or after
``CONFIRM_WAIT``. A real gRPC server on loopback (:class:`ScriptedApi`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import pytest
from frequenz.client.dispatch import DispatchApiClient

from dispatchd import apisync
from dispatchd.apisync import ApiSync, Listed, Streamed, SyncItem
from tests.shell.daemon_harness import MG, metric
from tests.shell.scripted_api import UPDATED, ScriptedApi, dispatch_pb, revised

WAIT = 10.0
FIRST_LISTING = 2.5
"""Bound for the first listing; the code before this test waited 5 s for headers first."""
LATER = datetime(2030, 1, 1, tzinfo=UTC)


class Delivered:
    """What the sync handed over, with a wake-up per item."""

    def __init__(self) -> None:
        self.items: list[SyncItem] = []
        self._changed = asyncio.Condition()

    async def deliver(self, item: SyncItem) -> None:
        self.items.append(item)
        async with self._changed:
            self._changed.notify_all()

    def listings(self) -> list[Listed]:
        return [item for item in self.items if isinstance(item, Listed)]

    async def wait_listings(self, count: int) -> list[Listed]:
        await self.wait_for(lambda: len(self.listings()) >= count)
        return self.listings()

    async def wait_streamed(self) -> None:
        await self.wait_for(lambda: any(isinstance(x, Streamed) for x in self.items))

    async def wait_for(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT), self._changed:
            await self._changed.wait_for(done)


@contextlib.asynccontextmanager
async def _syncing(api: ScriptedApi, delivered: Delivered) -> AsyncIterator[ApiSync]:
    client = DispatchApiClient(server_url=api.url, auth_key="k")
    sync = ApiSync(client, MG, delivered.deliver)
    task = asyncio.create_task(sync.run())
    try:
        yield sync
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.disconnect()


def _payloads(listed: Listed) -> dict[int, object]:
    return {d.id: d.payload for d in listed.dispatches}


async def test_lists_before_the_server_sends_anything_on_the_stream() -> None:
    delivered = Delivered()
    one = dispatch_pb(1, "A", LATER, timedelta(seconds=60), payload={"v": 1})
    async with ScriptedApi(headers_on_first_event=True) as api:
        api.put(one)
        async with _syncing(api, delivered) as sync:
            await api.wait_streams(1, WAIT)
            await api.wait_listings(1, FIRST_LISTING)
            assert api.first_event_sent_after_listings is None  # the stream said nothing yet
            await asyncio.wait_for(sync.synced.wait(), WAIT)
            assert [_payloads(x) for x in delivered.listings()] == [{1: {"v": 1}}]
            assert delivered.listings()[0].initial


async def test_a_change_between_listing_and_registration_is_listed_once_confirmed() -> None:
    delivered = Delivered()
    registering = asyncio.Event()
    one = dispatch_pb(1, "A", LATER, timedelta(seconds=60), payload={"v": 1})
    two = dispatch_pb(2, "B", LATER, timedelta(seconds=60))
    async with ScriptedApi(headers_on_first_event=True, registering=registering) as api:
        api.put(one)
        api.put(two)
        async with _syncing(api, delivered) as sync:
            await api.wait_listings(1, FIRST_LISTING)
            # Changed after the listing, before the server registered the stream:
            # no stream carries it.
            api.put(revised(one, datetime.now(UTC), payload={"v": 2}))
            registering.set()
            await api.wait_streams(1, WAIT)
            await api.push(UPDATED, revised(two, datetime.now(UTC), payload={"w": 1}))
            listings = await delivered.wait_listings(2)
            assert _payloads(listings[0])[1] == {"v": 1}
            assert _payloads(listings[1])[1] == {"v": 2}
            assert not listings[1].initial
            assert sync.relists == 1
            await delivered.wait_streamed()


async def test_lists_again_after_the_bound_when_the_stream_stays_silent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(apisync, "CONFIRM_WAIT", 0.2)
    delivered = Delivered()
    registering = asyncio.Event()
    one = dispatch_pb(1, "A", LATER, timedelta(seconds=60), payload={"v": 1})
    async with ScriptedApi(headers_on_first_event=True, registering=registering) as api:
        api.put(one)
        async with _syncing(api, delivered) as sync:
            await api.wait_listings(1, FIRST_LISTING)
            api.put(revised(one, datetime.now(UTC), payload={"v": 2}))
            registering.set()
            listings = await delivered.wait_listings(2)
            assert _payloads(listings[1])[1] == {"v": 2}
            assert sync.relists == 1


async def test_a_server_that_sends_headers_at_once_is_listed_once() -> None:
    delivered = Delivered()
    one = dispatch_pb(1, "A", LATER, timedelta(seconds=60), payload={"v": 1})
    async with ScriptedApi() as api:
        api.put(one)
        async with _syncing(api, delivered) as sync:
            await asyncio.wait_for(sync.synced.wait(), WAIT)
            await api.push(UPDATED, revised(one, datetime.now(UTC), payload={"v": 2}))
            await delivered.wait_streamed()
            assert len(delivered.listings()) == 1
            assert sync.relists == 0


async def test_a_renewal_whose_successor_stays_silent_lists_instead_of_reconnecting() -> None:
    """The old stream runs into its deadline before the new one's headers come: no
    failure and no backoff, a listing at once and another once the new one is confirmed."""
    delivered = Delivered()
    one = dispatch_pb(1, "A", LATER, timedelta(seconds=60), payload={"v": 1})
    async with ScriptedApi(headers_on_first_event=True) as api:
        api.put(one)
        client = DispatchApiClient(
            server_url=api.url, auth_key="k", stream_timeout=timedelta(seconds=1.5)
        )
        sync = ApiSync(client, MG, delivered.deliver)
        reconnects = metric("dispatchd_api_reconnects_total", microgrid_id=str(MG))
        task = asyncio.create_task(sync.run())
        try:
            await api.wait_streams(2, WAIT)  # the successor is registered, still silent
            two = revised(one, datetime.now(UTC), payload={"v": 2})
            api.put(two)
            await api.push(UPDATED, two)  # confirms the successor: listed again
            await delivered.wait_for(
                lambda: any(_payloads(x)[1] == {"v": 2} for x in delivered.listings())
            )
            assert sync.renewals >= 1
            assert metric("dispatchd_api_reconnects_total", microgrid_id=str(MG)) == reconnects
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.disconnect()

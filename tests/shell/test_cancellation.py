"""A stop that arrives in the same loop turn as a result must still stop the task.

Python 3.11's ``asyncio.wait_for`` returns the result and drops the
cancellation when both are ready at once; the daemon's loop and the API sync
then ran on after a SIGTERM and the graceful stop hung. Each test makes the
result and the cancellation arrive together, deterministically.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dispatchd.apisync import ApiSync, SyncItem
from dispatchd.core.engine import Engine
from dispatchd.loop import Loop
from dispatchd.publisher import Publisher
from dispatchd.store import Store
from tests.core.engine_helpers import MG, at, make
from tests.shell.daemon_harness import daemon_settings


class _AcceptedCall:
    """A stream call whose response headers arrive when the test says so."""

    def __init__(self) -> None:
        self.headers: asyncio.Future[tuple[Any, ...]] = asyncio.get_running_loop().create_future()

    def initial_metadata(self) -> asyncio.Future[tuple[Any, ...]]:
        return self.headers


async def _stopped(task: asyncio.Task[None]) -> None:
    """The task ends cancelled; one that swallowed the cancellation fails the test."""
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await task


async def _nowhere(_: SyncItem) -> None:
    raise AssertionError("nothing is delivered here")


async def test_api_sync_stopped_as_the_stream_is_accepted_stops() -> None:
    sync = ApiSync(client=None, microgrid_id=1, deliver=_nowhere)  # type: ignore[arg-type]
    call = _AcceptedCall()
    task = asyncio.create_task(sync._wait_accepted(call, 5.0))  # type: ignore[arg-type]
    await asyncio.sleep(0)  # waiting for the headers now
    call.headers.set_result(())
    task.cancel()
    await _stopped(task)


async def test_daemon_loop_stopped_as_an_item_arrives_stops(tmp_path: Path) -> None:
    settings = daemon_settings(tmp_path, "amqp://unused", "unused")
    engine = Engine()
    engine.relist(MG, [make(1, start=3600)], at(0), initial=True)
    store = Store(tmp_path / "state.sqlite3")
    publisher = Publisher(amqp_url="amqp://unused", exchange="unused", store=store)
    # A deadline in an hour, so the loop waits with a timeout.
    loop = Loop(settings, engine, store, publisher, clock=lambda: at(0), ready=asyncio.Event())
    steps: list[SyncItem | None] = []

    async def step(item: SyncItem | None) -> None:
        steps.append(item)

    loop._step = step  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(loop.run())
    await asyncio.sleep(0)  # waiting for an item or the deadline now
    loop.inbox.put_nowait(object())  # type: ignore[arg-type]
    task.cancel()
    await _stopped(task)
    store.close()
    assert steps == []
    assert loop.inbox.qsize() == 1  # a cancelled get leaves the item where it was

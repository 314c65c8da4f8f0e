"""Listings queued together are committed together, and nothing overtakes them.

A thousand microgrids list at start-up at once; one transaction (one fsync)
per batch instead of one per microgrid. A stream event queued between two
listings is still handled after the first and before the second.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from frequenz.client.common.streaming import Event as StreamEvent

from dispatchd.apisync import Listed, Streamed
from dispatchd.core.engine import Engine
from dispatchd.core.records import DispatchKey
from dispatchd.core.wire import Envelope
from dispatchd.loop import Loop
from dispatchd.store import OutboxItem, SqliteStore
from tests.core.engine_helpers import at, make
from tests.shell.daemon_harness import daemon_settings
from tests.shell.loop_helpers import SubmittedOnly


class CountingStore(SqliteStore):
    """Records the outbox envelopes of each commit."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.commits: list[list[Envelope]] = []

    async def commit(
        self,
        *,
        records: Mapping[DispatchKey, str | None] = {},
        meta: Mapping[int, Mapping[str, Any]] | None = None,
        envelopes: Sequence[Envelope] = (),
        terms: Mapping[int, int] | None = None,
    ) -> list[OutboxItem]:
        self.commits.append(list(envelopes))
        return await super().commit(records=records, meta=meta, envelopes=envelopes, terms=terms)


def _in(microgrid_id: int, dispatch_id: int) -> Any:
    return replace(make(dispatch_id, start=3600), microgrid_id=microgrid_id)


async def test_queued_listings_share_one_commit_and_keep_the_inbox_order(tmp_path: Path) -> None:
    settings = daemon_settings(tmp_path, "amqp://unused", "unused", microgrid_ids=(1, 2, 3))
    store = CountingStore(tmp_path / "state.sqlite3")
    publisher = SubmittedOnly()  # a real one would leave its messages in the outbox gauge
    ready = asyncio.Event()
    loop = Loop(settings, Engine(), store, publisher, clock=lambda: at(0), ready=ready)  # type: ignore[arg-type]
    first, second, third = _in(1, 10), _in(2, 20), _in(3, 30)
    changed = replace(
        first, payload={"changed": True}, update_time=first.update_time + timedelta(seconds=1)
    )
    task = asyncio.create_task(loop.run())
    for microgrid_id in (1, 2, 3):
        await asyncio.wait_for(loop.adopt(microgrid_id, [], None), 5)
    loop.syncing.update((1, 2, 3))
    # Queued together, with no await between them: the loop finds them all.
    loop.inbox.put_nowait(Listed(1, (first,), initial=True))
    loop.inbox.put_nowait(Listed(2, (second,), initial=True))
    loop.inbox.put_nowait(Streamed(1, StreamEvent.UPDATED, changed))
    loop.inbox.put_nowait(Listed(3, (third,), initial=True))
    try:
        await asyncio.wait_for(ready.wait(), 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
    committed = [
        [(e.dispatch_id, e.headers["event"]) for e in envelopes] for envelopes in store.commits
    ]
    assert committed == [
        [(10, "created"), (20, "created")],
        [(10, "updated")],
        [(30, "created")],
    ]
    assert loop.synced == {1, 2, 3}

"""A large step is committed in slices of whole dispatches, the meta with the last.

Only one slice's texts and message bodies are in memory at a time
(docs/architecture.md, "Memory at scale"); what the store holds afterwards is
what one transaction would have written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dispatchd import loop as loop_module
from dispatchd.apisync import Listed
from dispatchd.core.engine import Engine
from dispatchd.core.records import DispatchKey
from dispatchd.core.wire import Envelope
from dispatchd.loop import Loop
from dispatchd.store import OutboxItem, SqliteStore
from tests.core.engine_helpers import at, make
from tests.shell.daemon_harness import daemon_settings
from tests.shell.loop_helpers import SubmittedOnly

Commit = tuple[list[tuple[int, int]], list[tuple[int, int]], bool]


class SlicedStore(SqliteStore):
    """Records what each commit wrote: record keys, envelopes' dispatches, whether meta."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.commits: list[Commit] = []
        self.released = 0

    async def commit(
        self,
        *,
        records: Mapping[DispatchKey, str | None] = {},
        meta: Mapping[int, Mapping[str, Any]] | None = None,
        envelopes: Sequence[Envelope] = (),
        terms: Mapping[int, int] | None = None,
    ) -> list[OutboxItem]:
        self.commits.append(
            (
                sorted(records),
                [(e.microgrid_id, e.dispatch_id) for e in envelopes],
                meta is not None,
            )
        )
        return await super().commit(records=records, meta=meta, envelopes=envelopes, terms=terms)

    async def release_memory(self) -> None:
        self.released += 1
        await super().release_memory()


async def _first_sync(tmp_path: Path, counts: Mapping[int, int]) -> SlicedStore:
    """A first sync of ``counts[m]`` dispatches on each microgrid ``m``, listed together."""
    microgrid_ids = tuple(counts)
    settings = daemon_settings(tmp_path, "amqp://unused", "unused", microgrid_ids=microgrid_ids)
    store = SlicedStore(tmp_path / "state.sqlite3")
    publisher = SubmittedOnly()  # a real one would leave its messages in the outbox gauge
    ready = asyncio.Event()
    loop = Loop(settings, Engine(), store, publisher, clock=lambda: at(0), ready=ready)  # type: ignore[arg-type]
    task = asyncio.create_task(loop.run())
    try:
        for microgrid_id in microgrid_ids:
            await asyncio.wait_for(loop.adopt(microgrid_id, [], None), 5)
        loop.syncing.update(microgrid_ids)
        store.commits.clear()  # the adoptions' own (empty) commits
        for microgrid_id, count in counts.items():
            dispatches = tuple(
                replace(make(n, start=3600 + n), microgrid_id=microgrid_id)
                for n in range(1, count + 1)
            )
            loop.inbox.put_nowait(Listed(microgrid_id, dispatches, initial=True))
        await asyncio.wait_for(ready.wait(), 10)
        assert publisher.submitted == sum(counts.values())  # every created was handed over
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return store


async def _same_state(
    sliced: SqliteStore, whole: SqliteStore, microgrid_ids: Sequence[int]
) -> None:
    for microgrid_id in microgrid_ids:
        one, other = await sliced.load(microgrid_id), await whole.load(microgrid_id)
        assert one.records == other.records
        assert one.meta == other.meta
        assert [item.envelope.body for item in one.outbox] == [
            item.envelope.body for item in other.outbox
        ]


async def test_a_large_listing_is_committed_in_slices_with_the_meta_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = await _first_sync(tmp_path / "whole", {1: 5})
    monkeypatch.setattr(loop_module, "SLICE", 2)
    store = await _first_sync(tmp_path / "sliced", {1: 5})
    try:
        assert store.commits == [
            ([(1, 1), (1, 2)], [(1, 1), (1, 2)], False),
            ([(1, 3), (1, 4)], [(1, 3), (1, 4)], False),
            ([(1, 5)], [(1, 5)], True),
        ]
        assert len(whole.commits) == 1
        assert (store.released, whole.released) == (1, 0)  # only after a sliced step
        await _same_state(store, whole, [1])
    finally:
        await store.close()
        await whole.close()


async def test_listings_committed_together_are_sliced_when_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = await _first_sync(tmp_path / "whole", {1: 2, 2: 3})
    monkeypatch.setattr(loop_module, "SLICE", 3)
    store = await _first_sync(tmp_path / "sliced", {1: 2, 2: 3})
    try:
        assert store.commits == [
            ([(1, 1), (1, 2), (2, 1)], [(1, 1), (1, 2), (2, 1)], False),
            ([(2, 2), (2, 3)], [(2, 2), (2, 3)], True),
        ]
        assert len(whole.commits) == 1
        await _same_state(store, whole, [1, 2])
    finally:
        await store.close()
        await whole.close()

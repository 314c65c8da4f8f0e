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
from dispatchd.store import OutboxItem, Store
from tests.core.engine_helpers import at, make
from tests.shell.daemon_harness import daemon_settings
from tests.shell.loop_helpers import SubmittedOnly


class SlicedStore(Store):
    """Records what each commit wrote."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.commits: list[tuple[list[int], list[int], bool]] = []

    def commit(
        self,
        *,
        records: Mapping[DispatchKey, str | None] = {},
        meta: Mapping[str, Any] | None = None,
        envelopes: Sequence[Envelope] = (),
    ) -> list[OutboxItem]:
        self.commits.append(
            (
                sorted(key[1] for key in records),
                [e.dispatch_id for e in envelopes],
                meta is not None,
            )
        )
        return super().commit(records=records, meta=meta, envelopes=envelopes)


async def _first_sync(tmp_path: Path, count: int) -> SlicedStore:
    settings = daemon_settings(tmp_path, "amqp://unused", "unused", microgrid_ids=(1,))
    store = SlicedStore(tmp_path / "state.sqlite3")
    publisher = SubmittedOnly()
    ready = asyncio.Event()
    loop = Loop(settings, Engine(), store, publisher, clock=lambda: at(0), ready=ready)  # type: ignore[arg-type]
    dispatches = tuple(
        replace(make(n, start=3600 + n), microgrid_id=1) for n in range(1, count + 1)
    )
    loop.inbox.put_nowait(Listed(1, dispatches, initial=True))
    task = asyncio.create_task(loop.run())
    try:
        await asyncio.wait_for(ready.wait(), 10)
        assert publisher.submitted == count  # every created was handed over
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return store


async def test_a_large_listing_is_committed_in_slices_with_the_meta_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = await _first_sync(tmp_path / "whole", 5)
    monkeypatch.setattr(loop_module, "SLICE", 2)
    store = await _first_sync(tmp_path / "sliced", 5)
    try:
        assert store.commits == [
            ([1, 2], [1, 2], False),
            ([3, 4], [3, 4], False),
            ([5], [5], True),
        ]
        assert len(whole.commits) == 1
        sliced, one = store.load(), whole.load()
        assert sliced.records == one.records
        assert sliced.meta == one.meta
        assert [item.envelope.body for item in sliced.outbox] == [
            item.envelope.body for item in one.outbox
        ]
    finally:
        store.close()
        whole.close()

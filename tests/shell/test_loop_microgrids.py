"""The loop runs microgrids one by one: adopt, forget, and a commit the store fences.

A store stand-in records every commit and refuses (``Fenced``) the
microgrids the test says were taken by another replica; the loop must drop
those at once, commit the rest of the same step without them, and tell the
daemon which were lost.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dispatchd import loop as loop_module
from dispatchd.core.engine import Created, Engine
from dispatchd.core.records import DispatchKey, DispatchRecord
from dispatchd.core.wire import Envelope, format_time
from dispatchd.loop import Loop
from dispatchd.publisher import Publisher
from dispatchd.store import Fenced, OutboxItem, SqliteStore
from tests.core.engine_helpers import at, make
from tests.shell.daemon_harness import daemon_settings


class FencingStore(SqliteStore):
    """SQLite, but commits touching ``taken`` microgrids are refused like PostgreSQL would."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.taken: set[int] = set()
        self.commits: list[tuple[set[int], Mapping[int, int] | None]] = []
        self.metas: list[Mapping[int, Mapping[str, Any]] | None] = []

    async def commit(
        self,
        *,
        records: Mapping[DispatchKey, str | None] | None = None,
        meta: Mapping[int, Mapping[str, Any]] | None = None,
        envelopes: Sequence[Envelope] = (),
        terms: Mapping[int, int] | None = None,
    ) -> list[OutboxItem]:
        touched = {mg for mg, _ in records or {}} | set(meta or {})
        touched |= {envelope.microgrid_id for envelope in envelopes}
        self.commits.append((touched, terms))
        self.metas.append(meta)
        if touched & self.taken:
            raise Fenced(touched & self.taken)
        return await super().commit(records=records, meta=meta, envelopes=envelopes, terms=terms)


def make_loop(
    tmp_path: Path, store: FencingStore, terms: dict[int, int], *, shared: bool = False
) -> tuple[Loop, list[frozenset[int]]]:
    settings = daemon_settings(tmp_path, "amqp://unused", "unused")
    publisher = Publisher(amqp_url="amqp://unused", exchange="unused", store=store)
    lost: list[frozenset[int]] = []
    loop = Loop(
        settings,
        Engine(),
        store,
        publisher,
        clock=lambda: at(100),
        ready=asyncio.Event(),
        terms=lambda: terms,
        on_fenced=lost.append,
        shared=shared,
    )
    return loop, lost


async def adopt_all(loop: Loop, microgrid_ids: Iterable[int]) -> None:
    task = asyncio.create_task(loop.run())
    try:
        for microgrid_id in microgrid_ids:
            await asyncio.wait_for(loop.adopt(microgrid_id, [], None), 5)
    finally:
        task.cancel()


async def test_a_fenced_microgrid_is_dropped_and_the_rest_of_the_step_is_committed(
    tmp_path: Path,
) -> None:
    store = FencingStore(tmp_path / "state.sqlite3")
    terms = {7: 3, 8: 5}
    loop, lost = make_loop(tmp_path, store, terms)
    await adopt_all(loop, [7, 8])
    assert loop.active == {7, 8}
    for microgrid_id in (7, 8):
        dispatch = make(1, start=150, duration=20, microgrid_id=microgrid_id)
        await loop._commit(loop.engine.relist(microgrid_id, [dispatch], at(100), initial=True))
    before = {mg: len((await store.load(mg)).outbox) for mg in (7, 8)}

    store.taken = {7}  # another replica holds microgrid 7 now
    store.commits.clear()
    step = loop.engine.advance(at(160))  # both start at 150: one step, two microgrids
    assert {message.dispatch.microgrid_id for message in step.messages} == {7, 8}
    await loop._commit(step)

    assert lost == [frozenset({7})]
    assert loop.active == {8}
    assert [touched for touched, _ in store.commits] == [{7, 8}, {8}]
    assert all(given == terms for _, given in store.commits)
    assert len((await store.load(8)).outbox) == before[8] + 1
    assert len((await store.load(7)).outbox) == before[7]
    # Nothing of microgrid 7 is offered to the store again.
    store.commits.clear()
    await loop._commit(loop.engine.advance(at(200)))  # both stop at 170
    assert [touched for touched, _ in store.commits] == [{8}]
    await loop._publisher.close(0)  # hands back its share of the process-wide outbox gauge
    await store.close()


async def test_forget_leaves_no_state_and_no_later_commit(tmp_path: Path) -> None:
    store = FencingStore(tmp_path / "state.sqlite3")
    loop, lost = make_loop(tmp_path, store, {7: 1, 8: 1})
    task = asyncio.create_task(loop.run())
    try:
        await loop.adopt(7, [], None)
        await loop.adopt(8, [], None)
        loop.synced.add(7)
        await loop.forget(7)
    finally:
        task.cancel()
    assert loop.active == {8}
    assert 7 not in loop.synced
    assert loop.engine.microgrids() == {8}
    store.commits.clear()
    await loop._commit(
        loop.engine.relist(8, [make(2, start=500, microgrid_id=8)], at(100), initial=True)
    )
    assert [touched for touched, _ in store.commits] == [{8}]
    assert lost == []
    await loop._publisher.close(0)  # hands back its share of the process-wide outbox gauge
    await store.close()


async def test_a_commit_writes_the_meta_of_its_microgrids_and_all_of_them_once_a_refresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 1,000 microgrids the meta of all of them in every commit cost 3 ms a commit."""
    store = FencingStore(tmp_path / "state.sqlite3")
    loop, _ = make_loop(tmp_path, store, {7: 1, 8: 1, 9: 1})
    await adopt_all(loop, [7, 8, 9])
    monotonic = [1000.0]
    monkeypatch.setattr(loop_module, "time", SimpleNamespace(monotonic=lambda: monotonic[0]))
    await loop._commit(loop.engine.relist(7, [make(1, start=150)], at(100), initial=True))
    await loop._commit(loop.engine.apply(Created(make(3, start=170)), at(100)))
    monotonic[0] += loop_module.META_REFRESH
    await loop._commit(
        loop.engine.relist(8, [make(2, start=150, microgrid_id=8)], at(101), initial=True)
    )
    await loop._commit(loop.engine.apply(Created(make(4, start=170, microgrid_id=8)), at(102)))
    assert [set(meta or {}) for meta in store.metas] == [{7, 8, 9}, {7}, {7, 8, 9}, {8}]
    assert (await store.load(9)).meta == store.metas[2][9]  # (as of the refresh)
    assert (await store.load(8)).meta == store.metas[3][8]
    await loop._publisher.close(0)  # hands back its share of the process-wide outbox gauge
    await store.close()


@pytest.mark.parametrize("shared", [False, True])
async def test_an_acquired_microgrid_converges_at_once_in_a_cluster_and_waits_for_its_list_alone(
    tmp_path: Path, shared: bool
) -> None:
    """A takeover publishes what fell due while nobody owned the microgrid even if
    the API does not answer; a restarted single process waits for the fresh list."""
    store = FencingStore(tmp_path / "state.sqlite3")
    loop, _ = make_loop(tmp_path, store, {7: 2}, shared=shared)
    running_since_50 = DispatchRecord(
        dispatch=make(1, start=50, duration=100, microgrid_id=7),
        announced=None,
        sequence=1,
        last_emitted_at=at(40),
        tombstone=False,
    )
    task = asyncio.create_task(loop.run())
    try:
        await asyncio.wait_for(loop.adopt(7, [running_since_50], at(40)), 5)
    finally:
        task.cancel()
    bodies = [json.loads(item.envelope.body) for item in (await store.load(7)).outbox]
    if shared:
        (body,) = bodies
        assert (body["kind"], body["event"], body["reason"]) == ("running", "running", "resumed")
        assert body["scheduled_for"] == format_time(at(50))
    else:
        assert bodies == []
        assert loop.engine.held() == {7}
    await loop._publisher.close(0)  # hands back its share of the process-wide outbox gauge
    await store.close()

"""Both stores, driven by the same random commits and removals, hold the same state."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatchd.store import OutboxItem, SqliteStore, Store
from dispatchd.store.postgres import PostgresStore
from tests.shell.store_contract import envelope, everything

keys = st.tuples(st.integers(1, 3), st.integers(1, 6))
record_texts = st.text(  # what the record codec writes is JSON: no NUL, no lone surrogate
    alphabet=st.characters(min_codepoint=1, blacklist_categories=("Cs",)), max_size=20
)
commits = st.fixed_dictionaries(
    {
        "records": st.dictionaries(keys, st.one_of(st.none(), record_texts), max_size=6),
        "meta": st.one_of(
            st.none(),
            st.dictionaries(st.integers(1, 3), st.fixed_dictionaries({"v": st.integers()})),
        ),
        "envelopes": st.lists(keys, max_size=5),
    }
)
removals = st.lists(st.integers(0, 40), max_size=6)
operations = st.lists(st.one_of(commits, removals), max_size=10)


@pytest.fixture
async def postgres(postgres_url: str) -> AsyncIterator[PostgresStore]:
    store = await PostgresStore.open(postgres_url)
    yield store
    await store.close()


async def _emptied(store: PostgresStore, dsn: str) -> PostgresStore:
    db = await asyncpg.connect(dsn)
    try:
        await db.execute("TRUNCATE records, meta, outbox")
    finally:
        await db.close()
    return store


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(operations)
async def test_sqlite_and_postgresql_agree_on_every_sequence_of_steps(
    tmp_path: Path, postgres: PostgresStore, postgres_url: str, steps: list[Any]
) -> None:
    sqlite = SqliteStore(tmp_path / f"{uuid.uuid4().hex}.sqlite3")
    stores: list[Store] = [sqlite, await _emptied(postgres, postgres_url)]
    committed: list[list[OutboxItem]] = [[], []]
    try:
        for number, step in enumerate(steps):
            for index, store in enumerate(stores):
                if isinstance(step, dict):
                    committed[index] += await store.commit(
                        records=step["records"],
                        meta=step["meta"],
                        envelopes=[
                            envelope(number, microgrid_id=mg, dispatch_id=did)
                            for mg, did in step["envelopes"]
                        ],
                    )
                else:
                    items = committed[index]
                    await store.remove_from_outbox(
                        items[position].seq for position in step if position < len(items)
                    )
        lite, pg = await everything(sqlite), await everything(stores[1])
        assert lite.records == pg.records
        assert lite.meta == pg.meta
        # Seqs are each store's own numbers; the order and the messages must agree.
        assert [item.envelope for item in lite.outbox] == [item.envelope for item in pg.outbox]
        assert [i.envelope for i in await sqlite.outbox()] == [
            i.envelope for i in await stores[1].outbox()
        ]
        assert await sqlite.outbox_size() == await stores[1].outbox_size() == len(lite.outbox)
    finally:
        await sqlite.close()

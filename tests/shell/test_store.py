"""The store contract: what every backend (SQLite, PostgreSQL) does alike."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dispatchd import metrics
from dispatchd.store import SqliteStore, Store
from dispatchd.store.postgres import PostgresStore
from tests.conftest import temporary_database
from tests.shell.store_contract import OpenStore, envelope, everything

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
async def open_store(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_server: str
) -> AsyncIterator[OpenStore]:
    """Opens the backend's store; PostgreSQL on a database of this test's own."""
    opened: list[Store] = []
    async with contextlib.AsyncExitStack() as stack:
        dsn = ""
        if request.param == "postgresql":
            dsn = await stack.enter_async_context(temporary_database(postgres_server))

        async def open_() -> Store:
            store: Store
            if request.param == "sqlite":
                store = SqliteStore(tmp_path / "state" / "dispatchd.sqlite3")
            else:
                store = await PostgresStore.open(dsn)
            opened.append(store)
            return store

        yield open_
        for store in opened:
            await store.close()


@pytest.fixture
async def store(open_store: OpenStore) -> Store:
    return await open_store()


async def test_a_new_store_is_empty(store: Store) -> None:
    assert await store.microgrids() == set()
    loaded = await store.load(7)
    assert (loaded.records, loaded.meta, loaded.outbox) == ({}, {}, [])
    assert await store.outbox_size() == 0
    assert await store.outbox() == []


async def test_commit_round_trips_records_meta_and_envelopes(store: Store) -> None:
    envelopes = [envelope(1), envelope(2, dispatch_id=2), envelope(3, microgrid_id=8)]
    items = await store.commit(
        records={(7, 1): '{"a": 1}', (7, 2): '{"b": 2}', (8, 1): "x"},
        meta={7: {"synced": {"7": True}, "version": 3}, 8: {"version": 4}},
        envelopes=envelopes,
    )
    assert [item.envelope for item in items] == envelopes
    assert [item.seq for item in items] == sorted({item.seq for item in items})
    assert await store.microgrids() == {7, 8}
    seven = await store.load(7)
    assert seven.records == {(7, 1): '{"a": 1}', (7, 2): '{"b": 2}'}
    assert seven.meta == {"synced": {"7": True}, "version": 3}
    assert seven.outbox == items[:2]
    eight = await store.load(8)
    assert (eight.records, eight.meta, eight.outbox) == ({(8, 1): "x"}, {"version": 4}, items[2:])
    assert await store.outbox() == items
    assert await store.outbox([8]) == items[2:]
    assert await store.outbox([9]) == []


async def test_records_upsert_and_delete(store: Store) -> None:
    await store.commit(records={(7, 1): "one", (7, 2): "two"})
    await store.commit(records={(7, 1): "one again", (7, 2): None, (7, 3): "three"})
    assert (await store.load(7)).records == {(7, 1): "one again", (7, 3): "three"}
    await store.commit(records={(7, 99): None})  # deleting an unknown record is a no-op
    assert (await store.load(7)).records == {(7, 1): "one again", (7, 3): "three"}


@pytest.mark.parametrize("count", [100, 1200])  # 1200: PostgreSQL's bulk (COPY) path
async def test_one_commit_upserts_and_deletes_many_records(store: Store, count: int) -> None:
    await store.commit(records={(7, n): f"v{n}" for n in range(count)})
    changes: dict[tuple[int, int], str | None] = {(7, n): None for n in range(0, count, 2)}
    changes |= {(7, n): f"w{n}" for n in range(1, count, 2)} | {(8, 1): "new"}
    assert await store.commit(records=changes) == []
    expected = {(7, n): f"w{n}" for n in range(1, count, 2)} | {(8, 1): "new"}
    assert (await everything(store)).records == expected


async def test_every_commit_is_timed(store: Store) -> None:
    def commits() -> float:
        return metrics.REGISTRY.get_sample_value("dispatchd_store_commit_seconds_count") or 0

    before = commits()
    await store.commit(records={(7, 1): "r"}, envelopes=[envelope(1)])
    assert commits() == before + 1


async def test_meta_is_replaced_per_microgrid_only_when_given(store: Store) -> None:
    await store.commit(meta={1: {"a": 1}, 2: {"a": 2}})
    await store.commit(records={(1, 1): "r"})
    assert (await everything(store)).meta == {1: {"a": 1}, 2: {"a": 2}}
    await store.commit(meta={1: {"b": [1, 2]}})
    assert (await everything(store)).meta == {1: {"b": [1, 2]}, 2: {"a": 2}}


async def test_outbox_keeps_commit_order_across_commits_and_removals(store: Store) -> None:
    first = await store.commit(envelopes=[envelope(n) for n in range(3)])
    second = await store.commit(envelopes=[envelope(n) for n in range(3, 6)])
    everything_ = first + second
    assert [item.seq for item in everything_] == sorted(item.seq for item in everything_)
    assert len({item.seq for item in everything_}) == 6
    await store.remove_from_outbox([first[1].seq, second[0].seq])
    assert await store.outbox() == [first[0], first[2], second[1], second[2]]
    assert await store.outbox_size() == 4
    await store.remove_from_outbox([])
    assert await store.outbox_size() == 4


async def test_outbox_items_reads_back_the_given_seqs_that_are_still_there(
    store: Store,
) -> None:
    items = await store.commit(envelopes=[envelope(n, microgrid_id=7 + n % 2) for n in range(5)])
    await store.remove_from_outbox([items[2].seq])
    wanted = [items[4].seq, items[0].seq, items[2].seq, items[3].seq]
    assert await store.outbox_items(wanted) == [items[0], items[3], items[4]]
    assert await store.outbox_items([]) == []


async def test_seq_is_never_reused_after_the_newest_item_was_removed(store: Store) -> None:
    (item,) = await store.commit(envelopes=[envelope(1)])
    await store.remove_from_outbox([item.seq])
    (again,) = await store.commit(envelopes=[envelope(2)])
    assert again.seq > item.seq


async def test_a_batch_gets_growing_seqs_that_continue_after_reopen(
    open_store: OpenStore,
) -> None:
    store = await open_store()
    first = await store.commit(envelopes=[envelope(n) for n in range(500)])
    assert await store.outbox() == first
    seqs = [item.seq for item in first]
    assert seqs == sorted(set(seqs))
    await store.remove_from_outbox(item.seq for item in first)
    await store.close()
    reopened = await open_store()
    (after,) = await reopened.commit(envelopes=[envelope(500)])
    assert after.seq > first[-1].seq
    assert await reopened.outbox() == [after]


async def test_a_failing_commit_changes_nothing(store: Store) -> None:
    await store.commit(records={(7, 1): "kept"}, envelopes=[envelope(0)])

    class Broken:
        message_id = "x"
        routing_key = "k"
        type = "dispatch.running"
        microgrid_id = 7
        dispatch_id = 1
        headers = {"bad": object()}  # not JSON: fails after the record was written
        body = b""

    with pytest.raises(TypeError):
        await store.commit(
            records={(7, 1): "changed", (7, 2): "new"},
            envelopes=[Broken()],  # type: ignore[list-item]
        )
    loaded = await store.load(7)
    assert loaded.records == {(7, 1): "kept"}
    assert [item.envelope for item in loaded.outbox] == [envelope(0)]


async def test_reopen_after_close_sees_everything(open_store: OpenStore) -> None:
    store = await open_store()
    items = await store.commit(
        records={(7, 1): "r"}, meta={7: {"m": 1}}, envelopes=[envelope(1), envelope(2)]
    )
    await store.remove_from_outbox([items[0].seq])
    await store.close()
    reopened = await open_store()
    loaded = await reopened.load(7)
    assert loaded.records == {(7, 1): "r"}
    assert loaded.meta == {"m": 1}
    assert loaded.outbox == [items[1]]
    (later,) = await reopened.commit(envelopes=[envelope(3)])
    assert later.seq > items[1].seq


async def test_terms_for_microgrids_owned_alone_do_not_stop_a_commit(store: Store) -> None:
    """The SQLite store has no leases; PostgreSQL checks them (its own tests)."""
    if not isinstance(store, SqliteStore):
        pytest.skip("SQLite only")
    (item,) = await store.commit(envelopes=[envelope(1)], terms={7: 0})
    assert await store.outbox() == [item]

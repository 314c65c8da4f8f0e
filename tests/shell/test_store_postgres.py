"""The PostgreSQL store against the real server: migration, fencing, leases by the DB clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from dispatchd.store import Fenced, SchemaTooNew, StoreError, StoreWriteError
from dispatchd.store.postgres import SCHEMA_VERSION, PostgresStore, Taken
from tests.shell.store_contract import envelope, everything
from tests.tcpproxy import TcpProxy


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[PostgresStore]:
    opened = await PostgresStore.open(postgres_url)
    yield opened
    await opened.close()


async def test_replicas_starting_together_migrate_once(postgres_url: str) -> None:
    stores = await asyncio.gather(*(PostgresStore.open(postgres_url) for _ in range(6)))
    try:
        assert [await store.schema_version() for store in stores] == [SCHEMA_VERSION] * 6
        db = await asyncpg.connect(postgres_url)
        try:
            assert await db.fetchval("SELECT count(*) FROM schema_version") == 1
        finally:
            await db.close()
    finally:
        for store in stores:
            await store.close()


async def test_a_newer_schema_is_refused_with_one_line(postgres_url: str) -> None:
    await (await PostgresStore.open(postgres_url)).close()
    db = await asyncpg.connect(postgres_url)
    try:
        await db.execute("UPDATE schema_version SET version = version + 1")
    finally:
        await db.close()
    with pytest.raises(SchemaTooNew) as raised:
        await PostgresStore.open(postgres_url)
    message = str(raised.value)
    assert "\n" not in message
    assert message.endswith(
        f"schema version {SCHEMA_VERSION + 1} is newer than this dispatchd "
        f"understands ({SCHEMA_VERSION})"
    )


async def test_an_unreachable_server_is_one_line_without_the_password() -> None:
    dsn = "postgresql://someone:very-secret@127.0.0.1:1/nothing"
    with pytest.raises(StoreError) as raised:
        await PostgresStore.open(dsn, timeout=5)
    message = str(raised.value)
    assert message.startswith("state store postgresql://someone:***@127.0.0.1:1/nothing: ")
    assert "cannot connect" in message
    assert "very-secret" not in message and "\n" not in message


async def test_a_commit_under_the_held_term_is_written(store: PostgresStore) -> None:
    taken = await store.acquire("a", [7], lease_seconds=30)
    term = taken[7].term
    items = await store.commit(
        records={(7, 1): "r"}, meta={7: {"m": 1}}, envelopes=[envelope(1)], terms={7: term}
    )
    loaded = await store.load(7)
    assert (loaded.records, loaded.meta, loaded.outbox) == ({(7, 1): "r"}, {"m": 1}, items)


async def test_a_commit_with_a_stale_term_is_fenced_and_writes_nothing(
    store: PostgresStore,
) -> None:
    first = (await store.acquire("a", [7, 8], lease_seconds=30))[7].term
    await store.commit(records={(7, 1): "kept"}, terms={7: first})
    assert await store.release("a", 7, first)
    second = (await store.acquire("b", [7], lease_seconds=30))[7].term
    assert second == first + 1
    before = await everything(store)
    with pytest.raises(Fenced) as raised:
        await store.commit(
            records={(7, 1): "stale", (8, 1): "fine alone"},
            meta={7: {"m": 2}},
            envelopes=[envelope(1), envelope(2, microgrid_id=8)],
            terms={7: first, 8: first},
        )
    assert raised.value.microgrid_ids == {7}
    assert await everything(store) == before  # nothing of the commit, not even microgrid 8
    assert await store.outbox_size() == 0


@pytest.mark.parametrize("size", [1, 600])  # one statement; the bulk transaction (COPY)
async def test_either_way_of_committing_is_fenced_alike(store: PostgresStore, size: int) -> None:
    term = (await store.acquire("a", [7], lease_seconds=30))[7].term
    records: dict[tuple[int, int], str | None] = {(7, n): "r" for n in range(size)}
    items = await store.commit(
        records=records, envelopes=[envelope(n) for n in range(size)], terms={7: term}
    )
    assert [item.envelope.message_id for item in await store.outbox()] == [
        envelope(n).message_id for n in range(size)
    ]
    assert [item.seq for item in items] == sorted({item.seq for item in items})
    assert await store.release("a", 7, term)
    with pytest.raises(Fenced):
        await store.commit(
            records={(7, n): "stale" for n in range(size)},
            meta={7: {"x": 1}},
            envelopes=[envelope(n) for n in range(size)],
            terms={7: term},
        )
    loaded = await store.load(7)
    assert set(loaded.records.values()) == {"r"} and loaded.meta == {}
    assert len(loaded.outbox) == size


async def test_a_commit_touching_a_microgrid_without_a_term_is_fenced(
    store: PostgresStore,
) -> None:
    term = (await store.acquire("a", [7], lease_seconds=30))[7].term
    with pytest.raises(Fenced) as raised:
        await store.commit(meta={7: {}, 9: {}}, terms={7: term})
    assert raised.value.microgrid_ids == {9}
    with pytest.raises(Fenced):
        await store.commit(envelopes=[envelope(1, microgrid_id=9)], terms={7: term, 9: 0})


async def test_a_commit_after_the_lease_expired_is_fenced_even_if_nobody_took_it(
    store: PostgresStore,
) -> None:
    term = (await store.acquire("a", [7], lease_seconds=1))[7].term
    await _until_expired(store, 7)
    with pytest.raises(Fenced):
        await store.commit(records={(7, 1): "late"}, terms={7: term})
    assert (await store.load(7)).records == {}


async def test_a_takeover_waits_for_a_commit_in_flight(
    store: PostgresStore, postgres_url: str
) -> None:
    """The fenced commit locks the lease row: an acquire cannot slip in between."""
    term = (await store.acquire("a", [7], lease_seconds=1))[7].term
    db = await asyncpg.connect(postgres_url)
    try:
        async with db.transaction():
            await db.execute("SELECT 1 FROM leases WHERE microgrid_id = 7 FOR SHARE")
            await _until_expired(store, 7)
            taking = asyncio.create_task(store.acquire("b", [7], lease_seconds=30))
            done, _ = await asyncio.wait({taking}, timeout=0.5)
            assert not done  # blocked by the share lock a commit holds
        taken = await asyncio.wait_for(taking, 10)
    finally:
        await db.close()
    assert taken[7].term == term + 1
    assert taken[7].previous_owner == "a"


async def test_acquire_takes_only_free_or_expired_leases_and_counts_terms(
    store: PostgresStore,
) -> None:
    assert await store.acquire("a", [], lease_seconds=30) == {}
    first = await store.acquire("a", [1, 2], lease_seconds=30)
    assert {mg: (t.term, t.previous_owner) for mg, t in first.items()} == {
        1: (1, None),
        2: (1, None),
    }
    assert await store.acquire("b", [1, 2, 3], lease_seconds=30) == {3: Taken(1, None)}


async def test_two_replicas_acquiring_together_never_share_a_microgrid(
    postgres_url: str,
) -> None:
    stores = [await PostgresStore.open(postgres_url) for _ in range(4)]
    try:
        results = await asyncio.gather(
            *(
                store.acquire(f"r{n}", range(1, 21), lease_seconds=30)
                for n, store in enumerate(stores)
            )
        )
        owners: dict[int, list[int]] = {}
        for n, taken in enumerate(results):
            for microgrid_id in taken:
                owners.setdefault(microgrid_id, []).append(n)
        assert sorted(owners) == list(range(1, 21))
        assert all(len(holders) == 1 for holders in owners.values())
        view = await stores[0].view()
        assert {lease.microgrid_id: lease.term for lease in view.leases} == dict.fromkeys(
            range(1, 21), 1
        )
    finally:
        for store in stores:
            await store.close()


async def test_renewal_extends_only_unexpired_leases_of_the_replica(
    store: PostgresStore,
) -> None:
    await store.acquire("a", [1], lease_seconds=1)
    await store.acquire("a", [2], lease_seconds=30)
    await store.acquire("b", [3], lease_seconds=30)
    assert await store.renew("a", 30, [1, 2, 3]) == {1: 1, 2: 1}  # 3 is b's
    by_id = {lease.microgrid_id: lease for lease in (await store.view()).leases}
    assert 25 < by_id[1].expires_in <= 30  # renewed from the database's now()
    await store.acquire("a", [4], lease_seconds=1)
    await _until_expired(store, 4)
    assert await store.renew("a", 30, [1, 4]) == {1: 1}  # 4 expired: not renewed
    assert await store.acquire("b", [4], lease_seconds=30) == {4: Taken(2, "a")}


async def test_release_frees_the_lease_at_once_for_the_next_owner(store: PostgresStore) -> None:
    term = (await store.acquire("a", [5], lease_seconds=30))[5].term
    assert not await store.release("a", 5, term + 1)  # not that term
    assert not await store.release("b", 5, term)  # not that owner
    assert await store.acquire("b", [5], lease_seconds=30) == {}
    assert await store.release("a", 5, term)
    (lease,) = (await store.view()).leases
    assert (lease.owner, lease.term, lease.previous_owner) == (None, term, "a")
    assert lease.expires_in <= 0
    assert await store.acquire("b", [5], lease_seconds=30) == {5: Taken(term + 1, "a")}


async def test_membership_is_the_heartbeat_and_a_leaving_replica_is_gone(
    store: PostgresStore,
) -> None:
    await store.renew("a", 30, [])
    await store.renew("b", 1, [])
    view = await store.view()
    assert view.live_replicas() == ["a", "b"]
    assert all(replica.heartbeat_age < 1 for replica in view.replicas)
    deadline = time.monotonic() + 10
    while "b" in (await store.view()).live_replicas():
        assert time.monotonic() < deadline, "b never stopped being live"
        await asyncio.sleep(0.1)
    assert [replica.replica_id for replica in (await store.view()).replicas] == ["a", "b"]
    await store.leave("a")
    assert (await store.view()).live_replicas() == []


async def test_a_cut_or_silent_database_is_a_write_error_and_it_recovers(
    postgres_url: str,
) -> None:
    parts = urlsplit(postgres_url)
    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        proxied = urlunsplit(parts._replace(netloc=f"postgres@127.0.0.1:{proxy.port}"))
        store = await PostgresStore.open(proxied, timeout=1)
        try:
            await store.commit(records={(1, 1): "before"})
            proxy.pause()  # a partition: nothing comes back
            started = time.monotonic()
            with pytest.raises(StoreWriteError) as raised:
                await store.commit(records={(1, 1): "during"})
            assert time.monotonic() - started < 5
            assert str(raised.value).startswith(f"state store {store.location}: ")
            await proxy.refuse()  # a cut: resets, then refusals
            proxy.resume()
            with pytest.raises(StoreWriteError):
                await store.commit(records={(1, 1): "during"})
            for reading in (store.load(1), store.outbox(), store.view()):
                with pytest.raises(StoreWriteError):
                    await reading
            await proxy.accept()
            await store.commit(records={(1, 2): "after"})
            assert (await store.load(1)).records in (
                {(1, 1): "before", (1, 2): "after"},
                {(1, 1): "during", (1, 2): "after"},  # the paused commit may have landed
            )
        finally:
            await store.close()


async def _until_expired(store: PostgresStore, microgrid_id: int) -> None:
    """Wait until the database's clock says the lease expired (bounded)."""
    deadline = time.monotonic() + 10
    while True:
        leases = {lease.microgrid_id: lease for lease in (await store.view()).leases}
        if leases[microgrid_id].expires_in <= 0:
            return
        assert time.monotonic() < deadline, "the lease never expired"
        await asyncio.sleep(min(0.1, leases[microgrid_id].expires_in + 0.01))

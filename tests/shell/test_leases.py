"""The lease keeper against the real PostgreSQL: fair share, hand-over, loss on a cut, rejoin."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from urllib.parse import urlsplit, urlunsplit

import pytest
import structlog

from dispatchd import metrics
from dispatchd.leases import LeaseKeeper
from dispatchd.ownership import Acquired, HandOver, Lost, OwnershipEvent
from dispatchd.store import StoreError
from dispatchd.store.postgres import ClusterView, Lease, Listening, PostgresStore, Taken
from dispatchd.store.postgres import Replica as Replica_
from tests.tcpproxy import TcpProxy

LEASE = 1.5
MICROGRIDS = list(range(1, 7))
WAIT = 20.0


class Replica:
    """A keeper and a stand-in for the daemon: it releases at once what it must hand over."""

    def __init__(self, keeper: LeaseKeeper) -> None:
        self.keeper = keeper
        self.events: list[tuple[float, OwnershipEvent]] = []
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for event in self.keeper.events():
            self.events.append((time.monotonic(), event))
            self.changed.set()
            if isinstance(event, HandOver):
                await self.keeper.release(event.microgrid_id, event.term)

    def owned(self) -> set[int]:
        return set(self.keeper.terms())

    def of(self, kind: type[OwnershipEvent]) -> list[tuple[float, OwnershipEvent]]:
        return [(at, event) for at, event in self.events if isinstance(event, kind)]


async def until(
    condition: Callable[[], bool], replicas: list[Replica], within: float = WAIT
) -> None:
    """Wait, on the replicas' events and rounds, until ``condition`` holds (bounded)."""
    async with asyncio.timeout(within):
        while not condition():
            waits = [asyncio.create_task(r.changed.wait()) for r in replicas]
            waits += [asyncio.create_task(r.keeper.wait_round(r.keeper.rounds)) for r in replicas]
            for replica in replicas:
                replica.changed.clear()
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()


@pytest.fixture
async def cluster(postgres_url: str) -> AsyncIterator[Callable[..., object]]:
    async with AsyncExitStack() as stack:

        async def start(name: str, dsn: str = postgres_url, lease: float = LEASE) -> Replica:
            table = await PostgresStore.open(dsn, timeout=LEASE / 3)
            stack.push_async_callback(table.close)
            keeper = LeaseKeeper(
                table, replica_id=name, microgrid_ids=MICROGRIDS, lease_seconds=lease
            )
            keeper.start()
            replica = Replica(keeper)
            stack.push_async_callback(_stop, replica)
            return replica

        yield start


async def _stop(replica: Replica) -> None:
    await replica.keeper.close()
    await asyncio.wait_for(replica.task, 5)


def acquired(replica: Replica) -> set[int]:
    """The microgrids of the ``Acquired`` events the replica has recorded so far."""
    return {event.microgrid_id for _, event in replica.of(Acquired)}


def split_evenly(*replicas: Replica) -> bool:
    owned = [replica.owned() for replica in replicas]
    every = set().union(*owned)
    return (
        every == set(MICROGRIDS)
        and sum(map(len, owned)) == len(MICROGRIDS)
        and max(map(len, owned)) <= -(-len(MICROGRIDS) // len(replicas))
    )


async def test_two_replicas_split_the_microgrids_and_a_third_gets_its_share_by_hand_over(
    cluster: Callable[..., object],
) -> None:
    a: Replica = await cluster("a")  # type: ignore[misc]
    await until(lambda: a.owned() == set(MICROGRIDS), [a])
    assert metrics.REGISTRY.get_sample_value("dispatchd_microgrids_owned") == 6
    b: Replica = await cluster("b")  # type: ignore[misc]
    await until(lambda: split_evenly(a, b), [a, b])
    c_started = time.monotonic()
    c: Replica = await cluster("c")  # type: ignore[misc]
    # owned() is the keeper's own state; its events reach the replica's list a little later.
    await until(lambda: split_evenly(a, b, c) and acquired(c) == c.owned(), [a, b, c])
    assert {len(r.owned()) for r in (a, b, c)} == {2}
    assert not a.of(Lost) and not b.of(Lost) and not c.of(Lost)
    # Every microgrid c took was handed over by a or b and released at once, not expired.
    taken = [event for _, event in c.of(Acquired)]
    assert {event.previous_owner for event in taken} <= {"a", "b"}
    handed = {event.microgrid_id for r in (a, b) for at, event in r.of(HandOver) if at >= c_started}
    assert {event.microgrid_id for event in taken} == handed
    for replica in (a, b, c):  # the terms they fence with are the database's
        view = await replica.keeper._table.view()  # type: ignore[attr-defined]
        assert replica.keeper.terms() == {
            lease.microgrid_id: lease.term
            for lease in view.leases
            if lease.owner == replica.keeper.replica_id
        }


async def test_a_replica_cut_from_the_database_drops_everything_within_the_lease_and_rejoins(
    cluster: Callable[..., object], postgres_url: str
) -> None:
    parts = urlsplit(postgres_url)
    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        proxied = urlunsplit(parts._replace(netloc=f"postgres@127.0.0.1:{proxy.port}"))
        cut: Replica = await cluster("cut", proxied)  # type: ignore[misc]
        await until(lambda: cut.owned() == set(MICROGRIDS), [cut])
        other: Replica = await cluster("other")  # type: ignore[misc]
        await until(lambda: split_evenly(cut, other), [cut, other])
        held = cut.owned()
        lost_before = metrics.REGISTRY.get_sample_value("dispatchd_lease_lost_total") or 0
        proxy.pause()  # a silent partition: the worst case, nothing is refused
        cut_at = time.monotonic()
        await until(lambda: not cut.owned(), [cut], within=LEASE * 3)
        lost = cut.of(Lost)
        assert {event.microgrid_id for _, event in lost} == held
        assert max(at for at, _ in lost) - cut_at <= LEASE + 0.5  # slack: a loaded event loop
        assert metrics.REGISTRY.get_sample_value("dispatchd_lease_lost_total") == lost_before + 3
        await until(lambda: other.owned() == set(MICROGRIDS), [other])
        proxy.resume()
        await proxy.cut()  # the connections the pause hung are dead; new ones go through
        await until(lambda: split_evenly(cut, other), [cut, other])
        rejoined = [event for _, event in cut.of(Acquired)][-3:]
        assert {event.previous_owner for event in rejoined} == {"other"}


async def test_a_replica_that_leaves_is_replaced_at_once_by_release(
    cluster: Callable[..., object],
) -> None:
    a: Replica = await cluster("a")  # type: ignore[misc]
    b: Replica = await cluster("b")  # type: ignore[misc]
    await until(lambda: split_evenly(a, b), [a, b])
    a.keeper.stop_acquiring()
    leaving = dict(a.keeper.terms())
    for microgrid_id, term in leaving.items():  # what the daemon does at SIGTERM
        await a.keeper.release(microgrid_id, term)
    released_at = time.monotonic()
    await a.keeper.close()
    await until(lambda: b.owned() == set(MICROGRIDS), [b])
    # Released leases are free at once: well before they would have expired.
    assert time.monotonic() - released_at < LEASE
    taken = {e.microgrid_id: e for _, e in b.of(Acquired) if e.microgrid_id in leaving}
    assert {mg: (e.term, e.previous_owner) for mg, e in taken.items()} == {
        mg: (term + 1, "a") for mg, term in leaving.items()
    }


async def test_leases_are_renewed_every_third_and_each_event_is_one_log_line(
    cluster: Callable[..., object],
) -> None:
    with structlog.testing.capture_logs() as logs:
        a: Replica = await cluster("a")  # type: ignore[misc]
        await until(lambda: a.owned() == set(MICROGRIDS), [a])
        table = a.keeper._table  # type: ignore[attr-defined]
        # Sampled for two lease lengths: renewed every LEASE / 3, a lease never has
        # less than about two thirds left (renewing only every LEASE would let it expire).
        lowest = LEASE
        sampling_until = time.monotonic() + 2 * LEASE
        while time.monotonic() < sampling_until:
            view = await table.view()
            lowest = min(lowest, *(lease.expires_in for lease in view.leases))
            await asyncio.sleep(0.05)
        assert LEASE / 2 < lowest < LEASE
        assert metrics.REGISTRY.get_sample_value("dispatchd_cluster_replicas") == 1
        terms = a.keeper.terms()
        released = min(terms)
        await a.keeper.release(released, terms[released])
        await until(lambda: released in a.owned(), [a])  # it is free again: a takes it back
    acquired = [line for line in logs if line["event"] == "lease acquired"]
    assert sorted((line["microgrid_id"], line["term"]) for line in acquired) == sorted(
        [(mg, 1) for mg in MICROGRIDS] + [(released, 2)]
    )
    assert all("previous_owner" in line for line in acquired)
    assert [line["previous_owner"] for line in acquired if line["term"] == 2] == ["a"]
    (release,) = [line for line in logs if line["event"] == "lease released"]
    assert (release["microgrid_id"], release["term"]) == (released, 1)


async def test_a_lease_taken_meanwhile_cannot_be_released_by_its_old_owner(
    cluster: Callable[..., object],
) -> None:
    a: Replica = await cluster("a")  # type: ignore[misc]
    await until(lambda: a.owned() == set(MICROGRIDS), [a])
    a.keeper.stop_acquiring()
    table = a.keeper._table  # type: ignore[attr-defined]
    stolen = min(a.owned())
    term = a.keeper.terms()[stolen]
    assert await table.release("a", stolen, term)  # behind the keeper's back
    assert await table.acquire("intruder", [stolen], lease_seconds=30) != {}
    assert not await table.release("a", stolen, term)  # fenced by the intruder's term


async def test_releasing_a_lease_taken_meanwhile_counts_it_lost() -> None:
    """In memory, with rounds 10 s apart: the release alone must notice, not a round."""
    table = _FlakyTable()
    keeper = LeaseKeeper(table, replica_id="me", microgrid_ids=[1, 2], lease_seconds=30.0)
    keeper.start()
    replica = Replica(keeper)
    try:
        await until(lambda: replica.owned() == {1, 2}, [replica])
        rounds = keeper.rounds
        term = keeper.terms()[1]
        table.terms[1] = term + 1  # an intruder took it over
        lost_before = metrics.REGISTRY.get_sample_value("dispatchd_lease_lost_total") or 0
        await keeper.release(1, term)  # as after a fenced commit
        assert keeper.rounds == rounds
        assert replica.owned() == {2}
        assert metrics.REGISTRY.get_sample_value("dispatchd_lease_lost_total") == lost_before + 1
    finally:
        await _stop(replica)


class _FlakyTable:
    """A lease table in memory whose statements can fail with anything."""

    def __init__(self) -> None:
        self.failure: Exception | None = None
        self.terms: dict[int, int] = {}

    async def renew(
        self, replica_id: str, lease_seconds: float, microgrid_ids: object
    ) -> dict[int, int]:
        if self.failure is not None:
            raise self.failure
        return dict(self.terms)

    async def acquire(
        self, replica_id: str, microgrid_ids: object, lease_seconds: float
    ) -> dict[int, Taken]:
        taken = {mg: Taken(self.terms.get(mg, 0) + 1, None) for mg in microgrid_ids}  # type: ignore[attr-defined]
        self.terms.update({mg: t.term for mg, t in taken.items()})
        return taken

    async def release(self, replica_id: str, microgrid_id: int, term: int) -> bool:
        return self.terms.pop(microgrid_id, None) == term

    async def leave(self, replica_id: str) -> None:
        pass

    async def listen(self, wake: object) -> Listening:
        raise StoreError("no notifications here: the rounds do it all")

    async def view(self) -> ClusterView:
        return ClusterView(
            leases=[Lease(mg, "me", term, 30.0, None) for mg, term in self.terms.items()],
            replicas=[Replica_("me", 0.0, 30.0, "")],
        )


async def test_any_failure_of_a_round_is_survived_and_drops_the_leases_in_time() -> None:
    table = _FlakyTable()
    keeper = LeaseKeeper(table, replica_id="me", microgrid_ids=[1, 2], lease_seconds=1.0)
    keeper.start()
    replica = Replica(keeper)
    try:
        await until(lambda: replica.owned() == {1, 2}, [replica])
        table.failure = RuntimeError("a bug in a statement")
        table.terms.clear()  # expired meanwhile, from the database's view
        failed_at = time.monotonic()
        await until(lambda: not replica.owned(), [replica], within=3)
        assert time.monotonic() - failed_at <= 1.0 + 0.1
        table.failure = None
        await until(lambda: replica.owned() == {1, 2}, [replica])  # the rounds went on
        assert (len(replica.of(Acquired)), len(replica.of(Lost))) == (4, 2)
    finally:
        await _stop(replica)


async def test_a_release_or_a_join_is_acted_on_at_once_not_at_the_next_round(
    cluster: Callable[..., object],
) -> None:
    """With 30 s leases a round comes every 10 s; notifications make it a fraction of that."""
    a: Replica = await cluster("a", lease=30)  # type: ignore[misc]
    await until(lambda: a.owned() == set(MICROGRIDS), [a])
    await a.keeper.wait_round(a.keeper.rounds)  # its listener is open after a round
    b: Replica = await cluster("b", lease=30)  # type: ignore[misc]
    joined = time.monotonic()
    await until(lambda: split_evenly(a, b), [a, b], within=5)  # a hands over on b's join
    assert time.monotonic() - joined < 3
    a.keeper.stop_acquiring()
    leaving = a.keeper.terms()
    released = time.monotonic()
    for microgrid_id, term in leaving.items():  # SIGTERM: release, then leave
        await a.keeper.release(microgrid_id, term)
    await a.keeper.close()
    await until(lambda: b.owned() == set(MICROGRIDS), [b], within=5)
    assert time.monotonic() - released < 3

"""Fair share: replicas following ``plan`` converge on every microgrid owned exactly once."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from dispatchd.core.leases import NOTHING, LeaseRow, Plan, fair_share, plan

Owners = dict[int, str | None]


def view(owners: Owners) -> dict[int, LeaseRow]:
    return {
        microgrid_id: LeaseRow(owner, 10.0 if owner is not None else -1.0)
        for microgrid_id, owner in owners.items()
    }


def apply(me: str, chosen: Plan, owners: Owners) -> None:
    """What the database does: an acquire wins only a free lease; a release frees it."""
    for microgrid_id in chosen.acquire:
        if owners.get(microgrid_id) is None:
            owners[microgrid_id] = me
    for microgrid_id in chosen.hand_over:
        assert owners[microgrid_id] == me
        owners[microgrid_id] = None


def run_round(
    replicas: list[str], microgrids: list[int], owners: Owners, rng: random.Random, *, stale: bool
) -> None:
    """Every replica plans once, in a random order; with ``stale`` all from the round's start."""
    order = replicas[:]
    rng.shuffle(order)
    snapshot = view(owners)
    for me in order:
        seen = snapshot if stale else view(owners)
        chosen = plan(me, microgrids, replicas, seen)
        for microgrid_id in chosen.acquire:
            row = seen.get(microgrid_id)
            assert row is None or not row.held()  # only free or expired leases are tried
        apply(me, chosen, owners)


def settled(replicas: list[str], microgrids: list[int], owners: Owners) -> bool:
    return all(plan(me, microgrids, replicas, view(owners)) == NOTHING for me in replicas) and all(
        owners.get(microgrid_id) is not None for microgrid_id in microgrids
    )


def converge(
    replicas: list[str], microgrids: list[int], owners: Owners, rng: random.Random, *, stale: bool
) -> int:
    """Rounds until nobody wants to change anything (bounded)."""
    for rounds in range(1, 40):
        run_round(replicas, microgrids, owners, rng, stale=stale)
        if settled(replicas, microgrids, owners):
            return rounds
    raise AssertionError(f"no convergence: {owners}")


def check_fair(replicas: list[str], microgrids: list[int], owners: Owners) -> None:
    share = fair_share(len(microgrids), len(replicas))
    counts = {replica: 0 for replica in replicas}
    for microgrid_id in microgrids:
        owner = owners[microgrid_id]
        assert owner in counts, f"microgrid {microgrid_id} owned by {owner}, not a live replica"
        counts[owner] += 1
    assert sum(counts.values()) == len(microgrids)  # each owned exactly once
    assert max(counts.values()) <= share


clusters = st.tuples(
    st.integers(min_value=1, max_value=6),  # replicas
    st.integers(min_value=1, max_value=40),  # microgrids
    st.randoms(use_true_random=False),
    st.booleans(),  # stale views
)


@given(clusters)
def test_replicas_converge_on_every_microgrid_owned_once_within_the_fair_share(
    cluster: tuple[int, int, random.Random, bool],
) -> None:
    count, microgrid_count, rng, stale = cluster
    replicas = [f"r{n}" for n in range(count)]
    microgrids = list(range(100, 100 + microgrid_count))
    owners: Owners = {}
    rounds = converge(replicas, microgrids, owners, rng, stale=stale)
    check_fair(replicas, microgrids, owners)
    assert rounds <= (2 if not stale else 2 + count)


@given(clusters, st.data())
def test_after_a_replica_dies_or_one_joins_they_converge_again(
    cluster: tuple[int, int, random.Random, bool], data: st.DataObject
) -> None:
    count, microgrid_count, rng, stale = cluster
    replicas = [f"r{n}" for n in range(count)]
    microgrids = list(range(microgrid_count))
    owners: Owners = {}
    converge(replicas, microgrids, owners, rng, stale=stale)
    if count > 1 and data.draw(st.booleans()):
        dead = data.draw(st.sampled_from(replicas))
        replicas.remove(dead)
        # Its leases expire: the database shows them expired, with their old owner.
        for microgrid_id, owner in owners.items():
            if owner == dead:
                owners[microgrid_id] = None
    else:
        replicas.append("joined")
    before = dict(owners)
    converge(replicas, microgrids, owners, rng, stale=stale)
    check_fair(replicas, microgrids, owners)
    if not stale:
        # Only what had to move moved: nobody lost a microgrid it could keep within its share.
        share = fair_share(len(microgrids), len(replicas))
        for replica in replicas:
            kept = [mg for mg, owner in before.items() if owner == replica]
            still = [mg for mg in kept if owners[mg] == replica]
            assert len(still) >= min(len(kept), share)


@given(
    st.dictionaries(
        st.integers(min_value=0, max_value=30),
        st.tuples(
            st.sampled_from([None, "me", "a", "b", "gone"]),
            st.floats(min_value=-5, max_value=5, allow_nan=False),
        ),
    ),
    st.lists(st.integers(min_value=0, max_value=30), min_size=1, unique=True),
    st.sets(st.sampled_from(["a", "b", "c"])),
    st.sets(st.integers(min_value=0, max_value=30)),
)
def test_a_plan_is_deterministic_and_only_takes_free_and_gives_own(
    rows: dict[int, tuple[str | None, float]],
    microgrids: list[int],
    others: set[str],
    handing_over: set[int],
) -> None:
    leases = {mg: LeaseRow(owner, expires_in) for mg, (owner, expires_in) in rows.items()}
    chosen = plan("me", microgrids, sorted(others), leases, handing_over=handing_over)
    shuffled = dict(reversed(list(leases.items())))
    assert chosen == plan(
        "me",
        list(reversed(microgrids)),
        sorted(others, reverse=True),
        shuffled,
        handing_over=handing_over,
    )
    assert not (chosen.acquire and chosen.hand_over)
    for microgrid_id in chosen.acquire:
        assert microgrid_id in microgrids
        assert microgrid_id not in leases or not leases[microgrid_id].held()
    mine = {mg for mg, row in leases.items() if row.held() and row.owner == "me"}
    assert set(chosen.hand_over) <= mine - handing_over
    share = fair_share(len(microgrids), len(others | {"me"}))
    kept = len(mine) - len(handing_over & mine) - len(chosen.hand_over)
    assert kept >= min(share, len(mine - handing_over))  # never gives below its share


def test_fair_share_is_the_ceiling() -> None:
    assert [fair_share(12, n) for n in (1, 2, 3, 4, 5, 12, 13)] == [12, 6, 4, 3, 3, 1, 1]
    assert fair_share(3, 0) == 3  # nobody seen live yet: me alone


def test_a_fourth_replica_gets_its_share_by_one_hand_over_from_each() -> None:
    owners: Owners = {mg: f"r{mg % 3}" for mg in range(12)}
    replicas = ["r0", "r1", "r2", "r3"]
    for me in ("r0", "r1", "r2"):
        chosen = plan(me, range(12), replicas, view(owners))
        assert chosen.acquire == () and len(chosen.hand_over) == 1
    assert plan("r3", range(12), replicas, view(owners)) == NOTHING  # nothing free yet


def test_a_replica_below_its_share_takes_what_its_rank_prefers() -> None:
    owners: Owners = dict.fromkeys(range(10))
    first = plan("a", range(10), ["a", "b"], view(owners))
    second = plan("b", range(10), ["a", "b"], view(owners))
    assert len(first.acquire) == len(second.acquire) == 5
    assert first.acquire != second.acquire  # different first choices, fewer collisions

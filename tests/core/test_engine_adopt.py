"""One microgrid taken over (``Engine.adopt``) or given up (``Engine.forget``).

A replica that takes a microgrid over must say exactly what a restarted
process would have said about it, and taking or giving up one microgrid must
not change a single message of the others.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatchd.core.engine import Created, Engine, Updated
from dispatchd.core.messages import Message
from dispatchd.core.model import Dispatch
from dispatchd.core.records import DispatchRecord, last_seen_from_meta, record_from_text
from tests.core.engine_harness import Shape, shapes
from tests.core.engine_helpers import (
    at,
    bump,
    make,
    persist,
    reload,
    run_until,
    summaries,
)

A, B = 7, 8
IDS = (1, 2, 3)


def version(shape: Shape, microgrid_id: int, dispatch_id: int, updated: float) -> Dispatch:
    return replace(shape.version(dispatch_id, updated), microgrid_id=microgrid_id)


def of(microgrid_id: int, messages: list[Message]) -> list[tuple[Any, ...]]:
    return summaries([m for m in messages if m.dispatch.microgrid_id == microgrid_id])


def stored(store: dict[Any, Any], microgrid_id: int) -> list[DispatchRecord]:
    """One microgrid's records as a store hands them out (through their text)."""
    return [
        record_from_text(text, key[0])
        for key, text in store.items()
        if isinstance(key, tuple) and key[0] == microgrid_id
    ]


def history(fleet: dict[int, list[tuple[int, Shape]]], until: float) -> Engine:
    """An engine told about every version at time 0, run until ``until``."""
    engine = Engine()
    for microgrid_id, versions in fleet.items():
        for dispatch_id, shape in versions:
            dispatch = version(shape, microgrid_id, dispatch_id, 0)
            engine.apply(Created(dispatch), at(0))
    run_until(engine, until)
    return engine


fleets = st.fixed_dictionaries(
    {
        A: st.lists(st.tuples(st.sampled_from(IDS), shapes), max_size=3, unique_by=lambda v: v[0]),
        B: st.lists(st.tuples(st.sampled_from(IDS), shapes), max_size=3, unique_by=lambda v: v[0]),
    }
)

# What the first list after the takeover says about each dispatch: gone, unchanged, or a
# newer version (changed while nobody owned the microgrid).
listings = st.lists(st.tuples(st.sampled_from(IDS), st.one_of(st.none(), shapes)), max_size=3)


def first_list(
    fleet: dict[int, list[tuple[int, Shape]]],
    listing: list[tuple[int, Shape | None]],
    updated: float,
) -> list[Dispatch]:
    current = {dispatch_id: version(shape, A, dispatch_id, 0) for dispatch_id, shape in fleet[A]}
    for dispatch_id, shape in listing:
        if shape is None:
            current.pop(dispatch_id, None)
        else:
            current[dispatch_id] = version(shape, A, dispatch_id, updated)
    return [current[dispatch_id] for dispatch_id in sorted(current)]


def continue_after(
    engine: Engine, how: str, listed: list[Dispatch], now: float, horizon: float
) -> list[Message]:
    """What a process does after taking a microgrid: its first list, or the timeout."""
    out: list[Message] = []
    if how == "list":
        out.extend(engine.relist(A, listed, at(now), initial=True).messages)
    elif how == "timeout":
        out.extend(engine.resume(at(now), A).messages)
    out.extend(run_until(engine, horizon))
    return out


@settings(max_examples=80, deadline=None)
@given(
    fleet=fleets,
    crashed_at=st.integers(0, 300),
    down_for=st.integers(0, 300),
    how=st.sampled_from(["list", "timeout", "converged"]),
    listing=listings,
)
def test_adopting_a_microgrid_says_what_a_restart_says(
    fleet: dict[int, list[tuple[int, Shape]]],
    crashed_at: int,
    down_for: int,
    how: str,
    listing: list[tuple[int, Shape | None]],
) -> None:
    store: dict[Any, Any] = {}
    persist(history(fleet, crashed_at), store)
    taken_at = crashed_at + down_for
    listed = first_list(fleet, listing, taken_at)
    last_seen = last_seen_from_meta(store["meta"])
    assert last_seen == at(crashed_at)

    restarted = reload(store)
    restarted.hold(at(taken_at))
    adopter = Engine()
    adopted = adopter.adopt(
        A, stored(store, A), last_seen, at(taken_at), converge=how == "converged"
    )
    if how == "converged":
        resumed = restarted.resume(at(taken_at), A)
        assert of(A, adopted.messages) == of(A, resumed.messages)
        assert adopted.records == {k: v for k, v in resumed.records.items() if k[0] == A}
    else:
        assert adopted.messages == []
    then = taken_at + 1
    expected = of(A, continue_after(restarted, how, listed, then, then + 600))
    assert of(A, continue_after(adopter, how, listed, then, then + 600)) == expected
    assert adopter.snapshot(A) == restarted.snapshot(A)


@settings(max_examples=80, deadline=None)
@given(
    fleet=fleets,
    forget_at=st.integers(1, 200),
    away_for=st.integers(0, 200),
    changes=st.lists(st.tuples(st.integers(1, 500), st.sampled_from(IDS), shapes), max_size=3),
    converge=st.booleans(),
)
def test_forgetting_and_adopting_one_microgrid_leaves_the_others_alone(
    fleet: dict[int, list[tuple[int, Shape]]],
    forget_at: int,
    away_for: int,
    changes: list[tuple[int, int, Shape]],
    converge: bool,
) -> None:
    store: dict[Any, Any] = {}
    persist(history(fleet, 0), store)
    alone, moved = reload(store), reload(store)
    alone.resume(at(0))
    moved.resume(at(0))
    adopt_at = forget_at + away_for
    # Stream changes of B at their instants; A is forgotten and adopted in between.
    events: list[tuple[float, int, Any]] = [(forget_at, 0, "forget"), (adopt_at, 1, "adopt")]
    events.extend((when, 2, (dispatch_id, shape)) for when, dispatch_id, shape in changes)
    seen: dict[str, list[Message]] = {"alone": [], "moved": []}
    kept: dict[Any, Any] = {}
    for when, _, what in sorted(events, key=lambda e: (e[0], e[1])):
        seen["alone"].extend(run_until(alone, when))
        seen["moved"].extend(run_until(moved, when))
        if what == "forget":
            persist(moved, kept)
            moved.forget(A)
            assert A not in moved.microgrids() and A not in moved.counts()
            assert moved.snapshot(A) == []
        elif what == "adopt":
            last_seen = last_seen_from_meta(kept["meta"])
            step = moved.adopt(A, stored(kept, A), last_seen, at(when), converge=converge)
            seen["moved"].extend(step.messages)
        else:
            dispatch_id, shape = what
            newer = version(shape, B, dispatch_id, when)
            for engine, name in ((alone, "alone"), (moved, "moved")):
                change = (
                    Updated(newer) if dispatch_id in {i for i, _ in fleet[B]} else Created(newer)
                )
                seen[name].extend(engine.apply(change, at(when)).messages)
    seen["alone"].extend(run_until(alone, 1200))
    seen["moved"].extend(run_until(moved, 1200))
    assert of(B, seen["moved"]) == of(B, seen["alone"])
    assert moved.snapshot(B) == alone.snapshot(B)
    assert moved.counts().get(B) == alone.counts().get(B)


def test_forget_drops_pending_changes_and_timers_of_that_microgrid_only() -> None:
    engine = Engine()
    engine.apply(Created(make(1, start=100, duration=50, microgrid_id=A)), at(0))
    engine.apply(Created(make(1, start=120, duration=50, microgrid_id=B)), at(0))
    engine.forget(A)
    assert engine.next_deadline() == at(120)
    step = engine.advance(at(130))
    assert {key[0] for key in step.records} == {B}
    assert of(A, step.messages) == []


def test_a_microgrid_adopted_again_fires_on_its_own_timers_only() -> None:
    """Heap entries of the forgotten state must not match the re-adopted records."""
    engine = Engine()
    first = make(1, start=100, duration=50, microgrid_id=A)
    engine.apply(Created(first), at(0))
    store: dict[Any, Any] = {}
    persist(engine, store)
    engine.forget(A)
    later = bump(first, 5, start_time=300)
    record = replace(stored(store, A)[0], dispatch=later)
    engine.adopt(A, [record], at(0), at(10))
    assert engine.next_deadline() == at(300)
    assert summaries(run_until(engine, 400)) == [
        ("R", 1, "running", "started", 300, 350, 350, 300, 300, 1, None),
        ("R", 1, "stopped", "ended", 300, 350, None, 350, 350, 2, 300),
    ]


def test_adopt_refuses_records_of_another_microgrid() -> None:
    engine = Engine()
    engine.apply(Created(make(1, microgrid_id=B)), at(0))
    store: dict[Any, Any] = {}
    persist(engine, store)
    with pytest.raises(ValueError, match="belongs to microgrid 8, not 7"):
        engine.adopt(A, stored(store, B), None, at(1))


def test_adopting_what_the_previous_owner_left_running_reports_the_gap() -> None:
    """Killed at 70 inside [60, 70) + every 60 s: the run at 120 fell into the gap."""
    engine = Engine()
    engine.apply(Created(make(1, start=60, duration=30, every=60, count=4, microgrid_id=A)), at(0))
    run_until(engine, 70)
    store: dict[Any, Any] = {}
    persist(engine, store)
    adopter = Engine()
    step = adopter.adopt(A, stored(store, A), at(70), at(200))
    assert summaries(step.messages) == [
        ("R", 1, "running", "resumed", 180, 210, 210, 180, 200, 2, 60),
    ]
    assert step.messages[0].missed_runs == (at(120),)  # type: ignore[union-attr]

"""Random interleavings of changes, re-lists, restarts and time, with invariants
checked after every step against an independent replay of the messages and
the truth computed from ``Schedule`` directly."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatchd.core.engine import Created, Deleted, Engine, Updated
from dispatchd.core.messages import (
    Event,
    LifecycleMessage,
    Message,
    Occurrence,
    Reason,
    RunningMessage,
)
from dispatchd.core.model import Dispatch, Frequency, Recurrence
from dispatchd.core.recurrence import Invalid, Schedule
from tests.core.engine_helpers import MG, at, make, persist, reload

IDS = (1, 2, 3, 4)


@dataclass(frozen=True)
class Shape:
    """A dispatch version without id and update time."""

    start: int
    duration: int | None
    recurrence: Recurrence | None
    active: bool
    type: str
    payload: int

    def version(self, dispatch_id: int, updated: float) -> Dispatch:
        base = make(dispatch_id, start=self.start, duration=self.duration, updated=updated)
        return replace(
            base,
            recurrence=self.recurrence,
            active=self.active,
            type=self.type,
            payload={"p": self.payload},
        )


recurrences = st.one_of(
    st.none(),
    st.builds(
        lambda interval, count: Recurrence(
            frequency=Frequency.MINUTELY, interval=interval, count=count
        ),
        st.integers(1, 2),
        st.integers(1, 4),
    ),
    st.just(Recurrence(frequency=Frequency.MINUTELY, interval=0)),  # invalid
)

shapes = st.builds(
    Shape,
    start=st.integers(0, 400),
    duration=st.sampled_from([None, 0, 10, 30, 60, 90]),
    recurrence=recurrences,
    active=st.sampled_from([True, True, True, False]),
    type=st.sampled_from(["A", "B"]),
    payload=st.integers(0, 2),
)

operations = st.one_of(
    st.tuples(st.just("wait"), st.integers(0, 150)),
    st.tuples(st.just("tick")),
    st.tuples(st.just("upsert"), st.sampled_from(IDS), shapes, st.booleans(), st.booleans()),
    st.tuples(st.just("delete"), st.sampled_from(IDS), st.booleans()),
    st.tuples(
        st.just("relist"),
        st.lists(st.tuples(st.sampled_from(IDS), st.one_of(st.none(), shapes)), max_size=4),
        st.booleans(),
    ),
    st.tuples(st.just("restart"), st.sampled_from([0, 0, 30, 200])),
    st.tuples(
        st.just("tweak"),
        st.sampled_from(IDS),
        st.sampled_from(["payload", "type", "dry_run", "active"]),
        st.booleans(),
    ),
)


def runtime(dispatch: Dispatch) -> tuple[object, ...]:
    return (dispatch.type, dispatch.target, dispatch.duration, dispatch.dry_run, dispatch.payload)


def truth(dispatch: Dispatch, now: datetime) -> Occurrence | None:
    schedule = Schedule.build(dispatch)
    if isinstance(schedule, Invalid) or not dispatch.active:
        return None
    return schedule.occurrence_at(now)


@dataclass
class Replay:
    """What actors know, rebuilt only from the messages."""

    announced: dict[int, Occurrence | None] = field(default_factory=dict)
    sequence: dict[int, int] = field(default_factory=dict)
    last_emitted: dict[int, datetime] = field(default_factory=dict)
    runtime: dict[int, tuple[object, ...]] = field(default_factory=dict)
    missed: dict[int, tuple[datetime, ...]] = field(default_factory=dict)

    def feed(self, messages: list[Message], now: datetime) -> None:
        type_changed: set[int] = set()  # a stop for the old type in this very call
        for message in messages:
            assert message.emitted_at == now
            if isinstance(message, LifecycleMessage):
                continue
            assert isinstance(message, RunningMessage)
            dispatch_id = message.dispatch.id
            assert message.sequence == self.sequence.get(dispatch_id, 0) + 1
            assert message.running_state_change_synced == self.last_emitted.get(dispatch_id)
            assert message.scheduled_for <= message.emitted_at
            self.sequence[dispatch_id] = message.sequence
            self.last_emitted[dispatch_id] = message.emitted_at
            if message.event is Event.RUNNING:
                assert message.missed_runs == self.missed.pop(dispatch_id, ())
                assert message.dispatch.active
                assert not isinstance(Schedule.build(message.dispatch), Invalid)
                assert message.until == message.occurrence.end
                before = self.announced.get(dispatch_id)
                if dispatch_id in type_changed:
                    assert message.reason is Reason.RECONFIGURED
                    assert message.dispatch.type != self.runtime[dispatch_id][0]
                elif before is None:
                    assert message.reason in (Reason.STARTED, Reason.CREATED, Reason.RESUMED)
                elif before.start != message.occurrence.start:
                    assert message.reason in (Reason.STARTED, Reason.RESUMED)
                else:
                    assert message.reason is Reason.RECONFIGURED
                    assert runtime(message.dispatch) != self.runtime[dispatch_id] or (
                        before != message.occurrence
                    )
                self.announced[dispatch_id] = message.occurrence
                self.runtime[dispatch_id] = runtime(message.dispatch)
            else:
                assert message.until is None
                assert message.missed_runs == ()
                if message.reason is Reason.TYPE_CHANGED:
                    type_changed.add(dispatch_id)
                assert self.announced.get(dispatch_id) == message.occurrence
                self.announced[dispatch_id] = None


class Lockstep:
    """Two engines fed the same calls; every answer must be the same."""

    def __init__(self, main: Engine, twin: Engine) -> None:
        self.main = main
        self.twin = twin

    def __getattr__(self, name: str) -> Any:
        main, twin = getattr(self.main, name), getattr(self.twin, name)

        def both(*args: Any, **kwargs: Any) -> Any:
            answer = main(*args, **kwargs)
            assert twin(*args, **kwargs) == answer, name
            return answer

        return both


class Harness:
    def __init__(self) -> None:
        self.engine = Engine()
        self.now = 0.0
        self.clock = 0
        self.held: dict[int, Dispatch] = {}
        self.deleted: set[int] = set()
        self.forgotten: dict[int, Dispatch] = {}
        self.replay = Replay()
        self.store: dict[Any, Any] = {}

    def stamp(self) -> float:
        self.clock += 1
        return float(self.clock)

    def pre_advance(self, wanted: bool) -> None:
        if wanted:
            self.replay.feed(self.engine.advance(at(self.now)).messages, at(self.now))

    def step(self, operation: tuple[Any, ...]) -> None:
        kind = operation[0]
        now = at(self.now)
        if kind == "wait":
            self.now += operation[1]
            self.replay.feed(self.engine.advance(at(self.now)).messages, at(self.now))
        elif kind == "tick":
            deadline = self.engine.next_deadline()
            if deadline is not None and deadline >= now:
                self.now = (deadline - at(0)).total_seconds()
                self.replay.feed(self.engine.advance(deadline).messages, deadline)
        elif kind == "upsert":
            _, dispatch_id, shape, stale, pre = operation
            self.upsert(dispatch_id, shape, stale, pre)
        elif kind == "delete":
            _, dispatch_id, pre = operation
            self.pre_advance(pre)
            known = self.held.get(dispatch_id) or self.forgotten.pop(dispatch_id, None)
            victim = known or make(dispatch_id, updated=self.stamp())
            messages = self.engine.apply(Deleted(victim), now).messages
            self.replay.feed(messages, now)
            mine = [m for m in messages if m.dispatch.id == dispatch_id]
            if pre:
                assert mine == [m for m in messages]
            if dispatch_id in self.deleted or known is None:
                assert mine == []
            else:
                assert isinstance(mine[0], LifecycleMessage)
                assert mine[0].event is Event.DELETED
                assert all(isinstance(m, RunningMessage) for m in mine[1:])
            self.held.pop(dispatch_id, None)
            self.deleted.add(dispatch_id)
        elif kind == "tweak":
            _, dispatch_id, name, pre = operation
            self.tweak(dispatch_id, name, pre)
        elif kind == "relist":
            _, entries, pre = operation
            self.relist(dict(entries), pre)
        elif kind == "restart":
            persist(self.engine, self.store)
            # a second engine restored from nothing but the store
            restored = reload(self.store)
            down_since = now
            self.now += operation[1]
            self.expect_missed(down_since, at(self.now))
            resumed = restored.resume(at(self.now)).messages
            self.replay.feed(resumed, at(self.now))
            assert all(isinstance(m, RunningMessage) for m in resumed)
            if operation[1] == 0:
                # Restored at once, it must behave exactly like the original from now on.
                assert resumed == []
                original = self.engine
                while isinstance(original, Lockstep):
                    original = original.main
                self.engine = Lockstep(restored, original)  # type: ignore[assignment]
            else:
                self.engine = restored
        self.check()

    def upsert(self, dispatch_id: int, shape: Shape, stale: bool, pre: bool) -> None:
        now = at(self.now)
        self.pre_advance(pre)
        known = self.held.get(dispatch_id)
        ghost = self.forgotten.get(dispatch_id)
        if stale and (known or ghost) is not None:
            known = known or ghost
            assert known is not None
            updated = (known.update_time - at(0)).total_seconds() - (self.clock % 2)
            candidate = shape.version(dispatch_id, updated)
            messages = self.engine.apply(Updated(candidate), now).messages
            self.replay.feed(messages, now)
            if pre:
                assert messages == []
            return
        candidate = shape.version(dispatch_id, self.stamp())
        messages = self.engine.apply(Created(candidate), now).messages
        self.replay.feed(messages, now)
        mine = [m for m in messages if m.dispatch.id == dispatch_id]
        if pre:
            assert mine == messages
        if dispatch_id in self.deleted:
            assert mine == []
            return
        seen = known is not None or ghost is not None
        self.check_change_order(mine, expect="updated" if seen else "created")
        self.held[dispatch_id] = candidate
        self.forgotten.pop(dispatch_id, None)

    def expected_counts(self, now: datetime) -> dict[str, int]:
        counts = dict.fromkeys(("scheduled", "running", "finished", "inactive", "invalid"), 0)
        for dispatch_id, dispatch in self.held.items():
            schedule = Schedule.build(dispatch)
            if isinstance(schedule, Invalid):
                state = "invalid"
            elif not dispatch.active:
                state = "inactive"
            elif self.replay.announced.get(dispatch_id) is not None:
                state = "running"
            elif schedule.is_finished(now):
                state = "finished"
            else:
                state = "scheduled"
            counts[state] += 1
        if not self.held and not self.deleted and not self.forgotten:
            return {}
        return counts

    def expect_missed(self, since: datetime, until: datetime) -> None:
        """Runs that began and ended while down go with each one's next start."""
        if since >= until:
            return
        for dispatch_id, dispatch in self.held.items():
            schedule = Schedule.build(dispatch)
            if isinstance(schedule, Invalid) or not dispatch.active:
                continue
            begin = max(since, self.replay.last_emitted.get(dispatch_id, since))
            if begin >= until:
                continue
            earlier = tuple(t for t in self.replay.missed.get(dispatch_id, ()) if t <= begin)
            missed = (earlier + schedule.missed_runs(begin, until))[:100]
            if missed:
                self.replay.missed[dispatch_id] = missed
            else:
                self.replay.missed.pop(dispatch_id, None)

    def tweak(self, dispatch_id: int, name: str, pre: bool) -> None:
        """Change one field only, so the occurrence often stays the same."""
        known = self.held.get(dispatch_id)
        if known is None:
            return
        changes: dict[str, Any] = {
            "payload": {"p": known.payload.get("p", 0) + 1},
            "type": "B" if known.type == "A" else "A",
            "dry_run": not known.dry_run,
            "active": not known.active,
        }
        candidate = replace(known, update_time=at(self.stamp()), **{name: changes[name]})
        now = at(self.now)
        self.pre_advance(pre)
        messages = self.engine.apply(Updated(candidate), now).messages
        self.replay.feed(messages, now)
        self.check_change_order([m for m in messages if m.dispatch.id == dispatch_id], "updated")
        self.held[dispatch_id] = candidate

    def check_change_order(self, mine: list[Message], expect: str) -> None:
        lifecycle = [m for m in mine if isinstance(m, LifecycleMessage)]
        assert lifecycle and all(m.event.value == expect for m in lifecycle)
        first_running = next(
            (i for i, m in enumerate(mine) if isinstance(m, RunningMessage)), len(mine)
        )
        assert all(isinstance(m, LifecycleMessage) for m in mine[:first_running])
        assert all(isinstance(m, RunningMessage) for m in mine[first_running:])

    def relist(self, entries: dict[int, Shape | None], pre: bool) -> None:
        now = at(self.now)
        self.pre_advance(pre)
        listed: list[Dispatch] = []
        for dispatch_id, shape in sorted(entries.items()):
            if shape is None:
                if dispatch_id in self.held:
                    listed.append(self.held[dispatch_id])
            else:
                listed.append(shape.version(dispatch_id, self.stamp()))
        messages = self.engine.relist(MG, listed, now, initial=False).messages
        self.replay.feed(messages, now)
        listed_ids = {d.id for d in listed}
        for dispatch in listed:
            if dispatch.id in self.deleted:
                continue
            ghost = self.forgotten.get(dispatch.id)
            if ghost is not None and dispatch.update_time <= ghost.update_time:
                continue
            self.held[dispatch.id] = dispatch
            self.forgotten.pop(dispatch.id, None)
        for dispatch_id in sorted(set(self.held) - listed_ids):
            deleted = [
                m
                for m in messages
                if isinstance(m, LifecycleMessage)
                and m.dispatch.id == dispatch_id
                and m.event is Event.DELETED
            ]
            schedule = Schedule.build(self.held[dispatch_id])
            finished = not isinstance(schedule, Invalid) and schedule.is_finished(now)
            assert bool(deleted) != finished
            if deleted:
                self.deleted.add(dispatch_id)
            else:
                assert self.replay.announced.get(dispatch_id) is None
                self.forgotten[dispatch_id] = self.held[dispatch_id]
            del self.held[dispatch_id]

    def check(self) -> None:
        now = at(self.now)
        snapshot = {entry.dispatch.id: entry for entry in self.engine.snapshot(MG)}
        assert set(snapshot) == set(self.held)
        for dispatch_id, dispatch in self.held.items():
            expected = truth(dispatch, now)
            assert snapshot[dispatch_id].dispatch == dispatch
            assert snapshot[dispatch_id].occurrence == expected
            assert self.replay.announced.get(dispatch_id) == expected
            if expected is not None:
                assert self.replay.runtime[dispatch_id] == runtime(dispatch)
            assert snapshot[dispatch_id].sequence == self.replay.sequence.get(dispatch_id, 0)
        for dispatch_id in self.deleted:
            assert self.replay.announced.get(dispatch_id) is None
        assert self.engine.counts().get(MG, {}) == self.expected_counts(now)
        # nothing more is due now
        assert self.engine.advance(now).messages == []
        deadline = self.engine.next_deadline()
        assert deadline is None or deadline > now


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(operations, min_size=8, max_size=40))
def test_random_interleavings_keep_announcements_true(ops: list[tuple[Any, ...]]) -> None:
    harness = Harness()
    for operation in ops:
        harness.step(operation)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(IDS), shapes), min_size=1, max_size=6))
def test_boundaries_fire_exactly_on_time(versions: list[tuple[int, Shape]]) -> None:
    """Driven by its own deadlines, every transition is emitted at its due instant."""
    engine = Engine()
    for index, (dispatch_id, shape) in enumerate(versions):
        engine.apply(Created(shape.version(dispatch_id, float(index))), at(0))
    horizon = at(0) + timedelta(hours=1)
    while (deadline := engine.next_deadline()) is not None and deadline <= horizon:
        for message in engine.advance(deadline).messages:
            assert isinstance(message, RunningMessage)
            assert message.scheduled_for == message.emitted_at == deadline

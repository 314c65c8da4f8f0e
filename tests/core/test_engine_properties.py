"""Random interleavings of changes, re-lists, restarts and time, with invariants
checked after every step against an independent replay of the messages and
the truth computed from ``Schedule`` directly (the model is in ``engine_harness``)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatchd.core.engine import Created, Engine
from dispatchd.core.messages import RunningMessage
from tests.core.engine_harness import IDS, Harness, Shape, operations, shapes
from tests.core.engine_helpers import at


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

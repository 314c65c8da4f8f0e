"""The history behind ``tests/fixtures/state-2026-11-30.sqlite3``.

That state file was written by dispatchd as it was before the stored record
got its own module (times as ``+00:00`` beside the dispatch's ``Z``); this
history, replayed through the engine, is what it holds, so a test can check
that today's code loads it and converges with nothing to announce.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from dispatchd.core.engine import Deleted, Engine
from dispatchd.core.messages import Message
from dispatchd.core.model import Frequency
from tests.core.engine_helpers import MG, at, make

WRITTEN_AT = 600.25
"""Seconds after ``T0`` at which the state was saved (a fraction, to store microseconds)."""

RUNNING = make(1, start=500.5, duration=3600)
RECURRING = make(2, start=60, duration=30, every=120)
DELETED = make(3, start=300, duration=600)
FINISHED = make(4, start=10, duration=20)
INVALID = make(5, start=10, duration=20, interval=0, frequency=Frequency.DAILY)
ESCAPED = replace(make(6, start=5000, duration=60, type="Wärme"), payload={"note": "snow ☃"})

LISTED = [RUNNING, RECURRING, INVALID, ESCAPED]
"""What the API lists when the state is restored (the deleted and the finished ones are gone)."""


def replay(engine: Engine, after_step: Callable[[list[Message]], None]) -> None:
    """Drive ``engine`` through the history up to ``WRITTEN_AT``, handing on each step."""

    def run_to(seconds: float) -> None:
        while (deadline := engine.next_deadline()) is not None and deadline <= at(seconds):
            after_step(engine.advance(deadline).messages)
        after_step(engine.advance(at(seconds)).messages)

    everything = [RUNNING, RECURRING, DELETED, FINISHED, INVALID, ESCAPED]
    after_step(engine.relist(MG, everything, at(0), initial=True).messages)
    run_to(400)
    after_step(engine.apply(Deleted(DELETED), at(400)).messages)
    run_to(590)
    after_step(engine.relist(MG, LISTED, at(590), initial=False).messages)
    run_to(WRITTEN_AT)

"""docs/scheduling.md consequences 3, 4 and 5 observed end to end, in real time.

Slow on purpose (about 3.5 minutes): MINUTELY is the smallest recurrence
frequency, so the occurrences of a recurring dispatch are a minute apart and
the only way to see the later ones through the real API, scheduler and broker
is to wait for them. One test runs all three cases at once to pay that wait a
single time: three dispatches created together through the official client,
all starting at the same whole second ``s``:

- 3: recurring, 10 s every minute, count 3: running/stopped at s/s+10,
  s+60/s+70 and s+120/s+130;
- 4: overlapping, 90 s every minute, count 3: running at s, s+60 and s+120,
  each announcing its own occurrence's end, and one stopped at s+210;
- 5: back to back, 60 s every minute, count 3: running at s, s+60 and s+120,
  one stopped at s+180.

It checks the exact global message sequence (lifecycle ``created`` first,
then the running messages in schedule order, starts before stops and by
dispatch id at the same instant, then a quiet window), every running
message's ``occurrence``, ``until``, ``scheduled_for``, ``sequence``,
``reason``, ``running_state_change_synced`` and ``missed_runs``, and that each
arrives within ``LATE`` seconds of the instant it was due. The engine's unit
tests (tests/core/test_engine_consequences.py) pin the same sequences with a
simulated clock. Holding the API stream for minutes, it also checks that the
stream stays up (the embedded API used to drop it every 3 minutes over the
client's keepalive pings).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from frequenz.client.dispatch.recurrence import EndCriteria, Frequency, RecurrenceRule
from frequenz.client.dispatch.types import TargetIds

from tests.shell.daemon_harness import (
    MG,
    QueueObserver,
    Received,
    check_stream,
    metric,
    mg,
    running_daemon,
    whole_second,
)

LEAD = 3.0
"""Seconds from now to the common first start: time to create the three dispatches."""

LATE = 2.0
"""A message may arrive at most this many seconds after it was due (not a performance bound)."""

QUIET = 3.0
"""Seconds of silence required after the last expected message."""

CREATE_WAIT = 15.0
"""Upper bound for the lifecycle ``created`` messages (all due before the first start)."""

LAST = 210
"""Seconds after the first start of the last expected transition (consequence 4's stop)."""


@dataclass(frozen=True)
class Case:
    """One dispatch to create, and its expected running messages (seconds after ``s``)."""

    type: str
    duration: int
    expected: tuple[tuple[str, int, int, int | None], ...]
    """``(event, occurrence start, occurrence end, until)``, in order; the sequence is
    the position + 1, ``scheduled_for`` is the occurrence start for ``running`` and
    its end for ``stopped``, and the reason is ``started``/``ended``."""


CASES = (
    Case(
        "RECURRING",  # 3: every occurrence runs and stops on its own
        10,
        (
            ("running", 0, 10, 10),
            ("stopped", 0, 10, None),
            ("running", 60, 70, 70),
            ("stopped", 60, 70, None),
            ("running", 120, 130, 130),
            ("stopped", 120, 130, None),
        ),
    ),
    Case(
        "OVERLAP",  # 4: a new occurrence restarts, no stop at the covered ends 90 and 150
        90,
        (
            ("running", 0, 90, 90),
            ("running", 60, 150, 150),
            ("running", 120, 210, 210),
            ("stopped", 120, 210, None),
        ),
    ),
    Case(
        "BACK_TO_BACK",  # 5: each start announces its own occurrence; one stop at the end
        60,
        (
            ("running", 0, 60, 60),
            ("running", 60, 120, 120),
            ("running", 120, 180, 180),
            ("stopped", 120, 180, None),
        ),
    ),
)


@dataclass(frozen=True)
class Expected:
    dispatch_id: int
    event: str
    occurrence: tuple[datetime, datetime]
    until: datetime | None
    sequence: int

    @property
    def scheduled_for(self) -> datetime:
        return self.occurrence[0] if self.event == "running" else self.occurrence[1]

    @property
    def short(self) -> str:
        reason = "started" if self.event == "running" else "ended"
        return f"{self.dispatch_id}:running.{self.event}/{reason}"


def expectations(dispatch_id: int, case: Case, start: datetime) -> list[Expected]:
    def at(offset: int) -> datetime:
        return start + timedelta(seconds=offset)

    return [
        Expected(
            dispatch_id,
            event,
            (at(begin), at(end)),
            None if until is None else at(until),
            sequence,
        )
        for sequence, (event, begin, end, until) in enumerate(case.expected, start=1)
    ]


def check_running(received: Received, expected: Expected, arrived_at: datetime) -> None:
    """Every running field of one message, and that it came on time."""
    message = received.running
    assert received.short() == expected.short, (received.short(), expected)
    assert (message.occurrence.start, message.occurrence.end) == expected.occurrence, expected
    assert message.until == expected.until, expected
    assert message.scheduled_for == expected.scheduled_for, expected
    assert message.sequence == expected.sequence, expected
    assert message.missed_runs == (), expected
    late = timedelta(seconds=LATE)
    assert expected.scheduled_for <= message.emitted_at <= expected.scheduled_for + late, (
        message.emitted_at,
        expected,
    )
    assert arrived_at <= expected.scheduled_for + late, (arrived_at, expected)


@pytest.mark.timeout(LEAD + LAST + QUIET + 60)  # start-up, creation and stop: well within
async def test_3_4_5_recurring_overlapping_and_back_to_back_in_real_time(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    exchange = unique_name("e2e")
    async with (
        QueueObserver(amqp_url, exchange) as observer,
        running_daemon(tmp_path, amqp_url, exchange) as handle,
    ):
        reconnects = metric("dispatchd_api_reconnects_total", microgrid_id=str(MG))
        # Arrival instants are monotonic; this maps them onto the wall clock.
        wall0, mono0 = datetime.now(UTC), time.monotonic()

        def arrived_at(received: Received) -> datetime:
            return wall0 + timedelta(seconds=received.arrived - mono0)

        start = whole_second(LEAD)
        ids: list[int] = []
        for case in CASES:
            created = await handle.client.create(
                mg(),
                case.type,
                start,
                timedelta(seconds=case.duration),
                TargetIds(1),
                recurrence=RecurrenceRule(
                    frequency=Frequency.MINUTELY, interval=1, end_criteria=EndCriteria(count=3)
                ),
            )
            ids.append(int(created.id))
        assert datetime.now(UTC) < start, "creating took longer than LEAD: raise it"

        lifecycles = await observer.take(len(CASES), CREATE_WAIT)
        assert [r.short() for r in lifecycles] == [f"{d}:lifecycle.created/None" for d in ids]
        for received, case in zip(lifecycles, CASES, strict=True):
            dispatch = received.message.dispatch
            assert dispatch.type == case.type
            assert dispatch.start_time == start
            assert dispatch.duration == timedelta(seconds=case.duration)
            assert dispatch.recurrence is not None
            assert (dispatch.recurrence.interval, dispatch.recurrence.count) == (1, 3)
            last_end = max(end for _, _, end, _ in case.expected)
            assert dispatch.end_time == start + timedelta(seconds=last_end)
            assert arrived_at(received) < start

        # The whole schedule in publishing order: by instant, starts before stops, then by id.
        per_dispatch = {d: expectations(d, case, start) for d, case in zip(ids, CASES, strict=True)}
        timeline = sorted(
            (e for expected in per_dispatch.values() for e in expected),
            key=lambda e: (e.scheduled_for, e.event != "running", e.dispatch_id),
        )
        assert timeline[-1].scheduled_for == start + timedelta(seconds=LAST)
        for expected in timeline:
            # ``next``: nothing may come before the expected message, not even early.
            due_in = (expected.scheduled_for - datetime.now(UTC)).total_seconds()
            received = await observer.next(max(0.0, due_in) + LATE)
            check_running(received, expected, arrived_at(received))
        await observer.expect_quiet(QUIET)
        # A fault-free run: the API stream stayed up throughout (a stream held for
        # minutes must survive the client's keepalive pings), nothing was re-listed.
        assert metric("dispatchd_api_reconnects_total", microgrid_id=str(MG)) == reconnects

        by_id = {r.dispatch_id: r for r in lifecycles}
        for d, expected_of_d in per_dispatch.items():
            seen = observer.of(d)
            assert [r.short() for r in seen] == [
                f"{d}:lifecycle.created/None",
                *(e.short for e in expected_of_d),
            ]
            previous = None
            for received in seen[1:]:
                message = received.running
                # No update happened: every running message carries the created dispatch.
                assert message.dispatch == by_id[d].message.dispatch
                assert message.running_state_change_synced == (
                    None if previous is None else previous.emitted_at
                )
                previous = message
        check_stream(observer.received)

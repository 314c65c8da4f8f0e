"""Worst ``Schedule.build`` time for sparse rules, bounded by the evaluation budget.

Run: ``python bench/bench_rule_budget.py [--rules 2000] [--seed 1]``. Prints the
time of the reported rule (MINUTELY every 61 minutes at 05:40/05:53 on
Tuesdays that are the 1st, count 4096), then the slowest of ``--rules``
random sparse rules (MINUTELY/HOURLY/DAILY, interval up to 10,000, up to three
values in every by-list, count, until or neither) and how many were refused
as too sparse. Before the budget the reported rule alone took 5.8-16 s.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from datetime import UTC, datetime, timedelta

from dispatchd.core.model import Dispatch, Frequency, Recurrence, TargetIds, Weekday
from dispatchd.core.recurrence import EVALUATION_BUDGET, Invalid, Schedule

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
WEEKDAYS = list(Weekday)[1:]


def dispatch(start: datetime, rule: Recurrence) -> Dispatch:
    return Dispatch(
        id=1,
        microgrid_id=1,
        type="T",
        start_time=start,
        duration=timedelta(minutes=5),
        target=TargetIds(1),
        recurrence=rule,
        create_time=EPOCH,
        update_time=EPOCH,
    )


def timed(d: Dispatch) -> tuple[float, bool]:
    started = time.perf_counter()
    built = Schedule.build(d)
    return time.perf_counter() - started, isinstance(built, Invalid)


def random_rule(rng: random.Random) -> Recurrence:
    def some(low: int, high: int) -> tuple[int, ...]:
        return tuple(sorted(rng.sample(range(low, high + 1), rng.randint(0, 3))))

    end = rng.choice(["none", "count", "until"])
    return Recurrence(
        frequency=rng.choice([Frequency.MINUTELY, Frequency.HOURLY, Frequency.DAILY]),
        interval=rng.randint(1, 10_000),
        count=rng.randint(1, 4096) if end == "count" else None,
        until=EPOCH + timedelta(days=rng.randint(30, 365 * 3000)) if end == "until" else None,
        byminutes=some(0, 59),
        byhours=some(0, 23),
        byweekdays=tuple(rng.sample(WEEKDAYS, rng.randint(0, 3))),
        bymonthdays=tuple(d for d in some(-31, 31) if d),
        bymonths=some(1, 12),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rules", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"cores {os.cpu_count()}, load {os.getloadavg()}, budget {EVALUATION_BUDGET} steps")
    reported = Recurrence(
        frequency=Frequency.MINUTELY,
        interval=61,
        byminutes=(53, 40),
        byhours=(5,),
        byweekdays=(Weekday.TUESDAY,),
        bymonthdays=(1,),
        count=4096,
    )
    seconds, refused = timed(dispatch(datetime(2026, 11, 30, 6, tzinfo=UTC), reported))
    print(f"reported rule: {seconds * 1000:.1f} ms, refused={refused}")
    rng = random.Random(args.seed)
    worst, refused_count = 0.0, 0
    for _ in range(args.rules):
        start = EPOCH + timedelta(minutes=rng.randrange(0, 60 * 24 * 365 * 10))
        seconds, refused = timed(dispatch(start, random_rule(rng)))
        worst = max(worst, seconds)
        refused_count += refused
    print(
        f"{args.rules} random sparse rules: slowest {worst * 1000:.1f} ms, {refused_count} refused"
    )


if __name__ == "__main__":
    main()

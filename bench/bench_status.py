"""How long the status page's JSON holds the daemon's loop: ``/api/v1/schedule`` at its bounds.

The schedule is computed in the loop (it reads the engine), so its worst case
is a pause of everything else. Prints milliseconds per answer for microgrids
of growing size, up to the row limit, for one-off and recurring dispatches,
and for a refused request (over the limits), which must stay cheap.

    python bench/bench_status.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime, timedelta

from dispatchd import status
from dispatchd.core.engine import Created, Engine
from dispatchd.core.model import Dispatch, Frequency, Recurrence, TargetIds
from dispatchd.http import QueryError

MG = 7


def make(dispatch_id: int, now: datetime, recurring: bool) -> Dispatch:
    return Dispatch(
        id=dispatch_id,
        microgrid_id=MG,
        type=f"T{dispatch_id % 5}",
        start_time=now + timedelta(minutes=dispatch_id % 600),
        duration=timedelta(minutes=15),
        target=TargetIds(dispatch_id),
        recurrence=Recurrence(frequency=Frequency.HOURLY) if recurring else None,
        create_time=now,
        update_time=now,
    )


def engine_with(count: int, now: datetime, recurring: bool) -> Engine:
    engine = Engine()
    for dispatch_id in range(1, count + 1):
        engine.apply(Created(make(dispatch_id, now, recurring)), now)
    return engine


def measure(engine: Engine, now: datetime, rounds: int) -> tuple[float, int, str]:
    """Best milliseconds of ``rounds`` answers, the body size, and the outcome."""
    best = float("inf")
    size, outcome = 0, "200"
    for _ in range(rounds):
        started = time.perf_counter()
        try:
            query = status.parse_schedule_query({"microgrid_id": str(MG)}, now, [MG])
            # as the daemon does: refuse by the counts before building the rows
            status.check_rows(sum(engine.counts().get(MG, {}).values()), query)
            document = status.schedule_document(engine.snapshot(MG), query, now)
            size = len(json.dumps(document))
            outcome = "200"
        except QueryError as error:
            outcome = f"{error.status}"
        best = min(best, time.perf_counter() - started)
    return best * 1000, size, outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"cores={os.cpu_count()} load={os.getloadavg()[0]:.2f}")
    now = datetime.now(UTC).replace(microsecond=0)
    print("dispatches  recurring  answer  ms (best)  JSON bytes")
    for recurring in (False, True):
        for count in (100, 500, status.MAX_ROWS, status.MAX_ROWS + 1, 50_000):
            engine = engine_with(count, now, recurring)
            ms, size, outcome = measure(engine, now, args.rounds)
            print(f"{count:>10}  {recurring!s:>9}  {outcome:>6}  {ms:>9.1f}  {size:>10}")


if __name__ == "__main__":
    main()

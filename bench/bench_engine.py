"""Engine scale benchmark: load, per-update and per-transition cost, memory.

Run: ``python bench/bench_engine.py [sizes...]`` (default 1k 10k 50k 200k).
Columns: initial load (a first re-list of everything), a reconnect's re-list
with nothing changed, ``apply(Updated)`` (fastest of 5 rounds), cost per due transition
when advancing one day, ``counts()``, and bytes the engine allocates per
dispatch (tracemalloc, excluding the ``Dispatch`` values themselves).
Half the dispatches are one-off, half recurring (daily, some endless), with
start times spread over the next three days, in four microgrids. The target
is a per-update cost at 200k within 2x of the cost at 1k: a change must not
scan the other dispatches or the whole timer heap.
"""

from __future__ import annotations

import gc
import random
import sys
import time
import tracemalloc
from datetime import UTC, datetime, timedelta

from dispatchd.core.engine import Engine, Updated
from dispatchd.core.model import Dispatch, Frequency, Recurrence, TargetIds

NOW = datetime(2026, 11, 23, 12, tzinfo=UTC)
MICROGRIDS = 4
UPDATES = 2000
ROUNDS = 5
"""Updates are timed in rounds and the fastest round is reported: the least
disturbed by other processes on a shared machine."""


def population(n: int, rng: random.Random) -> list[Dispatch]:
    """``n`` dispatches, half one-off and half recurring, starting in the next 3 days."""
    dispatches = []
    for index in range(n):
        start = NOW + timedelta(seconds=rng.randrange(60, 3 * 86_400))
        recurring = index % 2 == 1
        recurrence = None
        if recurring:
            recurrence = Recurrence(
                frequency=Frequency.DAILY,
                interval=1,
                count=rng.choice([None, 5, 30]),
            )
        dispatches.append(
            Dispatch(
                id=index + 1,
                microgrid_id=index % MICROGRIDS,
                type=rng.choice(["PEAK_SHAVING", "FCR", "SOC_TARGET"]),
                start_time=start,
                duration=timedelta(minutes=rng.choice([5, 15, 60])),
                target=TargetIds(1, 2),
                payload={"power_w": rng.randrange(-10_000, 10_000)},
                recurrence=recurrence,
                create_time=NOW - timedelta(days=1),
                update_time=NOW - timedelta(days=1),
            )
        )
    return dispatches


def load(dispatches: list[Dispatch]) -> tuple[Engine, float]:
    engine = Engine()
    by_microgrid: dict[int, list[Dispatch]] = {}
    for dispatch in dispatches:
        by_microgrid.setdefault(dispatch.microgrid_id, []).append(dispatch)
    began = time.perf_counter()
    for microgrid_id, listed in by_microgrid.items():
        engine.relist(microgrid_id, listed, NOW, initial=True)
    return engine, time.perf_counter() - began


def relist_unchanged(engine: Engine, dispatches: list[Dispatch]) -> float:
    """Seconds for a reconnect's re-list of everything, nothing changed."""
    by_microgrid: dict[int, list[Dispatch]] = {}
    for dispatch in dispatches:
        by_microgrid.setdefault(dispatch.microgrid_id, []).append(dispatch)
    began = time.perf_counter()
    for microgrid_id, listed in by_microgrid.items():
        assert engine.relist(microgrid_id, listed, NOW, initial=False).messages == []
    return time.perf_counter() - began


def memory_per_dispatch(dispatches: list[Dispatch]) -> float:
    """Bytes the engine allocates per dispatch (records, schedules, heap)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    engine, _ = load(dispatches)  # the steps, with their records, are dropped
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del engine
    return (after - before) / len(dispatches)


def update_cost(engine: Engine, dispatches: list[Dispatch], rng: random.Random) -> float:
    """Seconds per ``apply(Updated)`` on random dispatches (payload or start)."""
    chosen = [rng.choice(dispatches) for _ in range(UPDATES)]
    versions = []
    for step, dispatch in enumerate(chosen):
        changes: dict[str, object] = {"payload": {"power_w": step}}
        if step % 2:
            changes["start_time"] = dispatch.start_time + timedelta(minutes=step % 90)
        versions.append(
            Dispatch(
                **{
                    **{f: getattr(dispatch, f) for f in Dispatch.__dataclass_fields__},
                    **changes,
                    "update_time": NOW + timedelta(microseconds=step + 1),
                }
            )
        )
    per_round = UPDATES // ROUNDS
    best = float("inf")
    for first in range(0, UPDATES, per_round):
        began = time.perf_counter()
        for step in range(first, first + per_round):
            engine.apply(Updated(versions[step]), NOW + timedelta(microseconds=step))
        best = min(best, (time.perf_counter() - began) / per_round)
    return best


def transition_cost(engine: Engine) -> tuple[float, int]:
    """Mean seconds per due transition over a day with many due, and how many."""
    began = time.perf_counter()
    messages = engine.advance(NOW + timedelta(days=1)).messages
    elapsed = time.perf_counter() - began
    return elapsed / max(1, len(messages)), len(messages)


def main(sizes: list[int]) -> None:
    print(
        f"{'n':>8} {'load s':>8} {'load µs/d':>10} {'relist s':>9} {'update µs':>10} "
        f"{'due µs':>8} {'due n':>8} {'counts ms':>10} {'mem B/d':>8}"
    )
    for n in sizes:
        rng = random.Random(n)
        dispatches = population(n, rng)
        memory = memory_per_dispatch(dispatches)
        gc.collect()
        engine, load_s = load(dispatches)
        relist_s = relist_unchanged(engine, dispatches)
        update_s = update_cost(engine, dispatches, rng)
        began = time.perf_counter()
        engine.counts()
        counts_s = time.perf_counter() - began
        due_s, due_n = transition_cost(engine)
        print(
            f"{n:>8} {load_s:>8.2f} {load_s / n * 1e6:>10.1f} {relist_s:>9.2f} "
            f"{update_s * 1e6:>10.1f} "
            f"{due_s * 1e6:>8.1f} {due_n:>8} {counts_s * 1e3:>10.1f} {memory:>8.0f}",
            flush=True,
        )
        del engine, dispatches
        gc.collect()


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [1_000, 10_000, 50_000, 200_000])

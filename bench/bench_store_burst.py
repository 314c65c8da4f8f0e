"""A burst's commits in the SQLite store, and where the WAL checkpoint falls.

Run: ``python bench/bench_store_burst.py [--bursts 60] [--dispatches 10000]``.

Each burst is committed as the loop commits one second of 10k MINUTELY
dispatches (``bench_minutely.py``): parts of 50, 100 and 17 starts, then
167 stops, each message with its record (about 1 KB of body and 1.1 KB of
record text); then its messages are removed from the outbox, as once the
broker confirmed them. Two stores are alternated burst by burst: dispatchd's
(the WAL checkpointed by that removal, off the event loop), and the same with
SQLite's automatic checkpoint on for the commits too (what dispatchd did
before), so it runs inside whichever commit crosses it. Printed: the median
and p90 milliseconds of each part's commit and of the removal, and the time
to the last start's commit.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from dispatchd.core.wire import Envelope
from dispatchd.store import SqliteStore
from dispatchd.store.sqlite import CHECKPOINT_PAGES

PARTS = (50, 100, 17, 167)
"""One second's burst as the loop commits it: three parts of starts, then the stops."""
STARTS_PARTS = 3
BODY = b'{"dispatch":"' + b"x" * 1000 + b'"}'
RECORD = '{"dispatch":"' + "y" * 1100 + '"}'


def envelopes(first: int, count: int, dispatches: int) -> list[Envelope]:
    return [
        Envelope(
            message_id=f"bench-{first + n}",
            routing_key="microgrid.1.running.running.BENCH",
            body=BODY,
            headers={"microgrid_id": 1, "dispatch_id": (first + n) % dispatches},
            type="dispatch.running",
            microgrid_id=1,
            dispatch_id=(first + n) % dispatches,
        )
        for n in range(count)
    ]


async def burst(
    store: SqliteStore,
    first: int,
    dispatches: int,
    figures: dict[str, list[float]],
    *,
    checkpoint_in_commits: bool,
) -> int:
    """Commit one burst in its parts, then remove its messages; returns the next message number."""
    seqs: list[int] = []
    began = time.perf_counter()
    for index, size in enumerate(PARTS):
        batch = envelopes(first, size, dispatches)
        records = {(1, e.dispatch_id): RECORD for e in batch}
        if checkpoint_in_commits:  # as before: SQLite checkpoints in whichever commit crosses it
            store._db.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_PAGES}")
        started = time.perf_counter()
        items = await store.commit(records=records, envelopes=batch, meta={1: {"at": first}})
        done = time.perf_counter()
        figures[f"commit of part {index + 1} ({size})"].append((done - started) * 1000)
        if index == STARTS_PARTS - 1:
            figures["instant -> last start committed"].append((done - began) * 1000)
        seqs += [item.seq for item in items]
        first += size
    started = time.perf_counter()
    await store.remove_from_outbox(seqs)
    figures["removal of the burst's messages"].append((time.perf_counter() - started) * 1000)
    return first


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--bursts", type=int, default=60)
    parser.add_argument("--dispatches", type=int, default=10_000)
    args = parser.parse_args()
    labels = {"dispatchd (checkpoint at removal)": False, "SQLite checkpoints in commits": True}
    figures: dict[str, dict[str, list[float]]] = {
        label: {
            **{f"commit of part {i + 1} ({size})": [] for i, size in enumerate(PARTS)},
            "instant -> last start committed": [],
            "removal of the burst's messages": [],
        }
        for label in labels
    }
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # the disk the state would be on
        stores = {
            label: SqliteStore(Path(tmp) / f"state-{n}.sqlite3") for n, label in enumerate(labels)
        }
        numbers = dict.fromkeys(labels, 0)
        for _ in range(args.bursts):
            for label, store in stores.items():
                numbers[label] = await burst(
                    store,
                    numbers[label],
                    args.dispatches,
                    figures[label],
                    checkpoint_in_commits=labels[label],
                )
        for store in stores.values():
            await store.close()
    for label, rows in figures.items():
        print(label)
        for name, values in rows.items():
            values = values[5:]  # the first bursts fill an empty file
            p90 = statistics.quantiles(values, n=10)[-1]
            print(f"  {name:<36} median {statistics.median(values):6.2f} ms  p90 {p90:6.2f} ms")


if __name__ == "__main__":
    asyncio.run(main())

"""Store commits on PostgreSQL against SQLite: one dispatch alone, and a first sync of 50k.

Run: ``python bench/bench_store_pg.py [--postgres-url URL] [--alone 300] [--sync 50000]``.

"alone" is what a dispatch starting alone costs the store: one commit of its
record, its meta and one ``running`` message, fenced by the lease term on
PostgreSQL (the check and its row lock are in the same transaction), timed
per commit; p50 and p99 are printed. "first sync" is one commit of N records
with N ``created`` messages and the meta, as the first list of a microgrid
with N dispatches writes it. The PostgreSQL figures are taken on a database
the bench creates and drops; SQLite in a temporary directory (``synchronous=FULL``,
so both are durable at commit). Note the machine's load (``uptime``) with
every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from dispatchd.core.wire import Envelope
from dispatchd.store import SqliteStore, Store
from dispatchd.store.postgres import PostgresStore

MICROGRID = 7
RECORD = '{"dispatch": {"id": %d, "type": "BENCH", "payload": "%s"}, "announced": null}'
BODY = b'{"dispatch": {"id": %d, "type": "BENCH"}, "padding": "' + b"x" * 700 + b'"}'


def envelope(dispatch_id: int, event: str) -> Envelope:
    return Envelope(
        message_id=f"bench-{event}-{dispatch_id}-{uuid.uuid4().hex[:8]}",
        routing_key=f"microgrid.{MICROGRID}.lifecycle.{event}.BENCH",
        body=BODY % dispatch_id,
        headers={
            "microgrid_id": MICROGRID,
            "dispatch_id": dispatch_id,
            "dispatch_type": "BENCH",
            "event": event,
            "schema": "dispatchd/v1",
        },
        type=f"dispatch.{event}",
        microgrid_id=MICROGRID,
        dispatch_id=dispatch_id,
    )


def record(dispatch_id: int) -> str:
    return RECORD % (dispatch_id, "p" * 800)


async def alone(store: Store, count: int, terms: dict[int, int] | None) -> list[float]:
    """Seconds of each commit of one record, the meta and one message."""
    seconds: list[float] = []
    for n in range(count):
        started = time.perf_counter()
        await store.commit(
            records={(MICROGRID, n): record(n)},
            meta={MICROGRID: {"last_seen": f"2026-11-30T10:00:{n % 60:02d}Z"}},
            envelopes=[envelope(n, "running")],
            terms=terms,
        )
        seconds.append(time.perf_counter() - started)
    return seconds


async def first_sync(store: Store, count: int, terms: dict[int, int] | None) -> float:
    records = {(MICROGRID, 1_000_000 + n): record(n) for n in range(count)}
    envelopes = [envelope(1_000_000 + n, "created") for n in range(count)]
    started = time.perf_counter()
    await store.commit(
        records=records,
        meta={MICROGRID: {"last_seen": "2026-11-30T10:00:00Z"}},
        envelopes=envelopes,
        terms=terms,
    )
    return time.perf_counter() - started


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def report(name: str, seconds: list[float]) -> None:
    ordered = sorted(seconds)
    p50 = statistics.median(ordered) * 1000
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
    print(f"  {name:<11} one dispatch alone: p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  (load {load()})")


async def with_database(server: str, run: Callable[[str], Awaitable[None]]) -> None:
    name = f"dispatchd_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    try:
        await run(urlunsplit(urlsplit(server)._replace(path=f"/{name}")))
    finally:
        admin = await asyncpg.connect(server)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--alone", type=int, default=300, help="commits of one dispatch")
    parser.add_argument("--sync", type=int, default=50_000, help="dispatches in the first sync")
    args = parser.parse_args()

    print(f"store commits ({args.alone} alone, first sync of {args.sync})")
    sync_seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = SqliteStore(Path(tmp) / "bench.sqlite3")
        report("SQLite", await alone(sqlite, args.alone, None))
        sync_seconds["SQLite"] = await first_sync(sqlite, args.sync, None)
        await sqlite.close()

    async def postgres(dsn: str) -> None:
        store = await PostgresStore.open(dsn)
        try:
            taken = await store.acquire("bench", [MICROGRID], lease_seconds=3600)
            terms = {MICROGRID: taken[MICROGRID].term}
            report("PostgreSQL", await alone(store, args.alone, terms))
            sync_seconds["PostgreSQL"] = await first_sync(store, args.sync, terms)
        finally:
            await store.close()

    await with_database(args.postgres_url, postgres)
    for name, seconds in sync_seconds.items():
        print(f"  {name:<11} first sync of {args.sync}: {seconds:6.2f} s  (load {load()})")
    ratio = sync_seconds["PostgreSQL"] / sync_seconds["SQLite"]
    print(f"  PostgreSQL / SQLite first sync: {ratio:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())

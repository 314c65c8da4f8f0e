"""A cluster at scale: replicas x microgrids x dispatches, time until all are owned and synced.

Run: ``python bench/bench_cluster_scale.py [--postgres-url URL] [--replicas 3]
[--microgrids 300] [--dispatches 20] [--steady-seconds 60] [--within 600]``.

Seeds ``--microgrids`` x ``--dispatches`` one-off dispatches (all starting
a day later, so nothing falls due while measuring) into the database of a
``dispatchd api`` process that serves every microgrid, creates a PostgreSQL
database and an exchange of its own, binds a consumer queue to the exchange
and spawns ``--replicas`` ``dispatchd run`` processes at once on that
database. From the spawn it polls the lease table and every replica's
``/readyz`` and prints:

- when every microgrid is owned, when the leases are split at the fair share
  and when, in addition, every replica's ``/readyz`` answers 200 (all it owns
  has finished its first sync): the time to a ready cluster;
- when the consumer has every ``created`` message (one per dispatch);
- CPU seconds (``/proc/<pid>/stat`` utime + stime) of each replica and of
  the API process from spawn to ready and over ``--steady-seconds`` after
  it (lease renewals, nothing due), and each replica's RSS.

If the cluster is not ready within ``--within`` seconds it prints what each
replica's ``/readyz`` still misses and its WARNING and ERROR log lines. Note
the machine's load (printed with the figures) and keep it otherwise idle.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiohttp
import asyncpg
from aio_pika.abc import AbstractIncomingMessage
from frequenz.api.dispatch.v1.dispatch_pb2 import DispatchData
from frequenz.client.base.conversion import to_timestamp

from dispatchd.localapi.storage import Storage
from dispatchd.localapi.validation import prepare_create

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Process:
    """``python -m dispatchd <command>`` with JSON logs read as they come."""

    def __init__(self, name: str, command: str, env: dict[str, str]) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.process: asyncio.subprocess.Process | None = None
        self.lines: list[dict[str, Any]] = []
        self.http_port = 0
        self.api_port = 0
        self.listening = asyncio.Event()
        self.synced: set[int] = set()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dispatchd",
            self.command,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            limit=1 << 20,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        async for raw in self.process.stderr:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            self.lines.append(line)
            event = line.get("event")
            if event == "local dispatch API listening":
                self.api_port = int(line["port"])
                self.listening.set()
            elif event == "http listening":
                self.http_port = int(line["address"].rpartition(":")[2])
            elif event == "first sync done":
                self.synced.add(int(line["microgrid_id"]))

    def events(self, name: str) -> int:
        return sum(1 for line in self.lines if line.get("event") == name)

    def cpu_seconds(self) -> float:
        assert self.process is not None
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        fields = stat.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def rss_mib(self) -> float:
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 60)
        except TimeoutError:
            process.kill()
            await process.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader


def seed(path: Path, microgrids: list[int], per_microgrid: int) -> None:
    """Write the dispatches straight into the API's database (fast, not measured)."""
    now = datetime.now(UTC)
    far = now + timedelta(days=1)
    storage = Storage(path)
    try:
        for microgrid_id in microgrids:
            for index in range(per_microgrid):
                data = DispatchData(type="BENCH", duration=60, is_active=True)
                data.start_time.CopyFrom(to_timestamp(far + timedelta(minutes=index)))
                data.target.component_ids.ids.extend([1, 2, 3])
                data.payload.update({"power_w": -5000, "n": index})
                storage.create(
                    microgrid_id, prepare_create(data, start_immediately=False, now=now), now
                )
    finally:
        storage.close()


async def held_leases(database: str) -> dict[int, str]:
    connection = await asyncpg.connect(database)
    try:
        rows = await connection.fetch(
            "SELECT microgrid_id, owner FROM leases WHERE owner IS NOT NULL AND expires_at > now()"
        )
    except asyncpg.UndefinedTableError:
        return {}  # no replica has migrated the schema yet
    finally:
        await connection.close()
    return {int(row[0]): str(row[1]) for row in rows}


async def readiness(http: aiohttp.ClientSession, replica: Process) -> tuple[bool, list[str]]:
    """``/readyz`` of a replica: ready, and what it misses (unreachable counts as missing)."""
    if not replica.http_port:
        return False, ["http not listening yet"]
    try:
        async with http.get(f"http://127.0.0.1:{replica.http_port}/readyz") as response:
            body = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        return False, [f"/readyz unreachable: {error!r}"]
    return response.status == 200, list(body.get("missing", []))


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def cluster_status(env: dict[str, str]) -> dict[str, Any] | None:
    """``dispatchd cluster status --json`` as the operator would run it."""
    result = subprocess.run(
        [sys.executable, "-m", "dispatchd", "cluster", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        print(f"  dispatchd cluster status failed: {result.stderr.strip()[-500:]}")
        return None
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def report_not_ready(replicas: list[Process], missing: dict[str, list[str]]) -> None:
    """What each replica still misses, and its WARNING and ERROR lines grouped by event."""
    for replica in replicas:
        lacks = missing.get(replica.name, [])
        print(f"  {replica.name}: /readyz misses {len(lacks)} item(s)")
        kinds = collections.Counter(
            item.split(": ", 1)[1] if item.startswith("microgrid ") else item for item in lacks
        )
        for text, count in kinds.most_common(8):
            print(f"    {count} x {text}")
        noisy = collections.Counter(
            (str(line.get("level")), str(line.get("event")), str(line.get("error", ""))[:160])
            for line in replica.lines
            if str(line.get("level", "")).lower() in {"warning", "error", "critical"}
        )
        for (level, event, error), count in noisy.most_common(10):
            print(f"    log {level} x{count}: {event} {error}")


async def bench(args: argparse.Namespace) -> None:
    server_url = args.postgres_url
    name = f"dispatchd_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    database = urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    exchange_name = f"bench-cluster-scale-{uuid.uuid4().hex[:8]}"
    microgrids = list(range(1, args.microgrids + 1))
    total = len(microgrids) * args.dispatches
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHD_")}
    print(
        f"cluster scale: {args.replicas} replicas x {len(microgrids)} microgrids x "
        f"{args.dispatches} dispatches = {total}; lease_seconds {args.lease_seconds:g}; {load()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        seed(Path(tmp) / "api" / "dispatches.sqlite3", microgrids, args.dispatches)
        api = Process(
            "api",
            "api",
            {
                **clean,
                "DISPATCHD_STATE__DIR": f"{tmp}/api",
                "DISPATCHD_API__LOCAL__LISTEN": "127.0.0.1:0",
                "DISPATCHD_LOG__FORMAT": "json",
            },
        )
        await api.start()
        await asyncio.wait_for(api.listening.wait(), 120)
        connection = await aio_pika.connect(args.amqp_url)
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, "#")
        created: set[tuple[str, int]] = set()
        marks: dict[str, float] = {}
        spawned = time.perf_counter()
        all_created = asyncio.Event()

        async def on_message(message: AbstractIncomingMessage) -> None:
            words = (message.routing_key or "").split(".")
            if words[2:4] == ["lifecycle", "created"]:
                created.add((words[1], int(str(message.headers["dispatch_id"]))))
                if len(created) >= total and not all_created.is_set():
                    marks["created"] = time.perf_counter() - spawned
                    all_created.set()

        await queue.consume(on_message, no_ack=True)
        base = {
            **clean,
            "DISPATCHD_AMQP__URL": args.amqp_url,
            "DISPATCHD_AMQP__EXCHANGE": exchange_name,
            "DISPATCHD_STATE__URL": database,
            "DISPATCHD_CLUSTER__LEASE_SECONDS": str(args.lease_seconds),
            "DISPATCHD_API__URL": f"grpc://127.0.0.1:{api.api_port}?ssl=false",
            "DISPATCHD_API__AUTH_KEY": "any",
            "DISPATCHD_HTTP__LISTEN": "127.0.0.1:0",
            "DISPATCHD_MICROGRID_IDS": json.dumps(microgrids),
            "DISPATCHD_LOG__FORMAT": "json",
            "DISPATCHD_LOG__LEVEL": "INFO",
        }
        replicas = [
            Process(
                f"replica-{n}",
                "run",
                {
                    **base,
                    "DISPATCHD_CLUSTER__REPLICA_ID": f"replica-{n}",
                    "DISPATCHD_STATE__DIR": f"{tmp}/replica-{n}",
                },
            )
            for n in range(1, args.replicas + 1)
        ]
        share = -(-len(microgrids) // len(replicas))
        try:
            api_cpu_before = api.cpu_seconds()
            spawned = time.perf_counter()
            await asyncio.gather(*(replica.start() for replica in replicas))
            missing: dict[str, list[str]] = {}
            timeout = aiohttp.ClientTimeout(total=10)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                while time.perf_counter() - spawned < args.within:
                    seen = await held_leases(database)
                    now = time.perf_counter() - spawned
                    counts = collections.Counter(seen.values())
                    if len(seen) == len(microgrids):
                        marks.setdefault("owned", now)
                        if all(counts[r.name] <= share for r in replicas):
                            marks.setdefault("fair", now)
                    answers = await asyncio.gather(*(readiness(http, r) for r in replicas))
                    missing = {
                        r.name: lacks for r, (_, lacks) in zip(replicas, answers, strict=True)
                    }
                    if "fair" in marks and all(ready for ready, _ in answers):
                        marks["ready"] = time.perf_counter() - spawned
                        break
                    await asyncio.sleep(0.25)
            at_ready = {r.name: r.cpu_seconds() for r in replicas}
            api_at_ready = api.cpu_seconds()
            rss_ready = {r.name: r.rss_mib() for r in replicas}
            print(f"  spawn -> every microgrid owned: {_mark(marks, 'owned')} ({load()})")
            print(f"  spawn -> leases at fair share ({share}): {_mark(marks, 'fair')}")
            print(
                f"  spawn -> every /readyz 200 (all owned and first-synced): "
                f"{_mark(marks, 'ready')} ({load()})",
                flush=True,
            )
            if "ready" not in marks:
                print(f"  NOT READY within {args.within:g} s; held leases {len(seen)}")
                report_not_ready(replicas, missing)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_created.wait(), args.within)
            print(
                "  spawn -> consumer has every created: "
                + (
                    f"{marks['created']:.2f} s ({len(created)} of {total})"
                    if all_created.is_set()
                    else f"NOT within {args.within:g} s more ({len(created)} of {total})"
                ),
                flush=True,
            )
            for replica in replicas:
                print(
                    f"  {replica.name}: owns {counts[replica.name]}, first syncs "
                    f"{len(replica.synced)} ({replica.events('first sync done')} lines), "
                    f"leases acquired "
                    f"{replica.events('lease acquired')}, handed over "
                    f"{replica.events('microgrid handed over')}; CPU spawn -> ready "
                    f"{at_ready[replica.name]:.2f} s; RSS {rss_ready[replica.name]:.0f} MiB"
                )
            print(f"  api process: CPU spawn -> ready {api_at_ready - api_cpu_before:.2f} s")
            status = cluster_status(
                {**clean, **{k: base[k] for k in base if k.startswith("DISPATCHD_")}}
            )
            if status is not None:
                owned = {r["replica_id"]: r["owned"] for r in status["replicas"] if r["live"]}
                held = sum(1 for lease in status["leases"] if lease["held"])
                print(f"  dispatchd cluster status: {held} leases held, owned {owned}")
            if args.steady_seconds > 0:
                before = {r.name: r.cpu_seconds() for r in replicas}
                events_before = {r.name: len(r.lines) for r in replicas}
                api_before = api.cpu_seconds()
                started = time.perf_counter()
                await asyncio.sleep(args.steady_seconds)
                seconds = time.perf_counter() - started
                print(f"  steady {seconds:.0f} s after ready ({load()}):")
                for replica in replicas:
                    used = replica.cpu_seconds() - before[replica.name]
                    lines = replica.lines[events_before[replica.name] :]
                    changes = sum(
                        1
                        for line in lines
                        if line.get("event") in {"lease acquired", "lease lost", "lease released"}
                    )
                    print(
                        f"    {replica.name}: CPU {used:.2f} s ({100 * used / seconds:.1f} % of a"
                        f" core), RSS {replica.rss_mib():.0f} MiB, lease changes {changes}, "
                        f"log lines {len(lines)}"
                    )
                print(f"    api process: CPU {api.cpu_seconds() - api_before:.2f} s")
        finally:
            await asyncio.gather(*(replica.stop() for replica in replicas))
            await api.stop()
            with contextlib.suppress(Exception):
                await exchange.delete()
            await connection.close()
            admin = await asyncpg.connect(server_url)
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()


def _mark(marks: dict[str, float], key: str) -> str:
    return f"{marks[key]:.2f} s" if key in marks else "not reached"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--microgrids", type=int, default=300)
    parser.add_argument("--dispatches", type=int, default=20)
    parser.add_argument("--lease-seconds", type=float, default=10.0)
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    parser.add_argument("--within", type=float, default=600.0)
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()

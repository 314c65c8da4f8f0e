"""Failover of a cluster: ``kill -9`` of a replica until the actors hear its microgrids again.

Run: ``python bench/bench_failover.py [--postgres-url URL] [--lease-seconds 10]
[--microgrids 12] [--replicas 3]``.

Starts a local dispatch API in-process and ``--replicas`` replica processes
(``dispatchd run`` with ``state.url`` on a database the bench creates and
drops), waits until the microgrids are split evenly, gives every microgrid a
dispatch that starts 1 s after the kill, kills the replica owning microgrid 1
with SIGKILL and measures, at a consumer bound to the exchange, the time from
the kill to the first ``running`` message of each microgrid it owned. The
promise (docs/replicas.md) is ``lease_seconds + 5 s``. Note the
machine's load (``uptime``) with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.types import TargetIds

from dispatchd.localapi.server import LocalApiServer
from dispatchd.settings import LocalApiConfig


class Replica:
    """One ``dispatchd run`` process; its JSON log lines are read as they come."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.env = env
        self.process: asyncio.subprocess.Process | None = None
        self.lines: list[dict[str, Any]] = []
        self.synced = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dispatchd",
            "run",
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self.reader = asyncio.create_task(self._read())
        await asyncio.wait_for(self.synced.wait(), 120)

    async def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        async for raw in self.process.stderr:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            self.lines.append(line)
            if line.get("event") == "first sync done":
                self.synced.set()

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()


async def owners(database: str) -> dict[int, str]:
    connection = await asyncpg.connect(database)
    try:
        rows = await connection.fetch(
            "SELECT microgrid_id, owner FROM leases WHERE owner IS NOT NULL AND expires_at > now()"
        )
    finally:
        await connection.close()
    return {int(row[0]): str(row[1]) for row in rows}


async def bench(args: argparse.Namespace) -> None:
    server_url = args.postgres_url
    name = f"dispatchd_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    database = urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    exchange = f"bench-failover-{uuid.uuid4().hex[:8]}"
    microgrids = list(range(1, args.microgrids + 1))
    with tempfile.TemporaryDirectory() as tmp:
        api = LocalApiServer.from_config(
            LocalApiConfig(listen="127.0.0.1:0", database=Path(tmp) / "api.sqlite3")
        )
        port = await api.start()
        connection = await aio_pika.connect(args.amqp_url)
        channel = await connection.channel()
        topic = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(topic, "microgrid.*.running.#")
        first_seen: dict[int, float] = {}
        heard = asyncio.Event()
        wanted: set[int] = set()

        async def on_message(message: AbstractIncomingMessage) -> None:
            microgrid_id = int((message.routing_key or "").split(".")[1])
            first_seen.setdefault(microgrid_id, time.time())
            if wanted and wanted <= set(first_seen):
                heard.set()

        await queue.consume(on_message, no_ack=True)
        base = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DISPATCHD_")},
            "DISPATCHD_AMQP__URL": args.amqp_url,
            "DISPATCHD_AMQP__EXCHANGE": exchange,
            "DISPATCHD_STATE__URL": database,
            "DISPATCHD_CLUSTER__LEASE_SECONDS": str(args.lease_seconds),
            "DISPATCHD_API__URL": f"grpc://127.0.0.1:{port}?ssl=false",
            "DISPATCHD_API__AUTH_KEY": "any",
            "DISPATCHD_HTTP__LISTEN": "127.0.0.1:0",
            "DISPATCHD_MICROGRID_IDS": json.dumps(microgrids),
            "DISPATCHD_LOG__FORMAT": "json",
        }
        replicas = [
            Replica(
                f"replica-{n}",
                {
                    **base,
                    "DISPATCHD_CLUSTER__REPLICA_ID": f"replica-{n}",
                    "DISPATCHD_STATE__DIR": f"{tmp}/replica-{n}",
                },
            )
            for n in range(1, args.replicas + 1)
        ]
        try:
            for replica in replicas:
                await replica.start()
            share = -(-len(microgrids) // len(replicas))
            while True:  # the lease table signals nothing: poll it
                seen = await owners(database)
                counts = [list(seen.values()).count(r.name) for r in replicas]
                if len(seen) == len(microgrids) and all(c == share for c in counts):
                    break
                await asyncio.sleep(0.2)
            victim_name = seen[1]
            victim = next(r for r in replicas if r.name == victim_name)
            taken = sorted(mg for mg, owner in seen.items() if owner == victim_name)
            client = DispatchApiClient(
                server_url=f"grpc://127.0.0.1:{port}?ssl=false", auth_key="any"
            )
            kill_at = datetime.now(UTC) + timedelta(seconds=3)
            for microgrid_id in microgrids:
                await client.create(
                    MicrogridId(microgrid_id),
                    "FAILOVER",
                    kill_at + timedelta(seconds=1),
                    timedelta(seconds=60),
                    TargetIds(1),
                )
            await asyncio.sleep((kill_at - datetime.now(UTC)).total_seconds())
            assert victim.process is not None
            killed = time.time()
            os.kill(victim.process.pid, signal.SIGKILL)
            wanted.update(taken)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(heard.wait(), args.lease_seconds + 30)
            delays = [first_seen[mg] - killed for mg in taken if mg in first_seen]
            missing = [mg for mg in taken if mg not in first_seen]
            load = os.getloadavg()[0]
            print(
                f"failover: {len(replicas)} replicas, {len(microgrids)} microgrids, "
                f"lease_seconds {args.lease_seconds:g}; killed {victim_name} owning {taken}"
            )
            if delays:
                print(
                    f"  kill -9 -> first running message of a taken-over microgrid: "
                    f"min {min(delays):.2f} s, median {statistics.median(delays):.2f} s, "
                    f"max {max(delays):.2f} s (promise: {args.lease_seconds + 5:g} s; "
                    f"load {load:.2f})"
                )
            if missing:
                print(f"  NOT heard from within {args.lease_seconds + 30:g} s: {missing}")
        finally:
            for replica in replicas:
                await replica.stop()
            await connection.close()
            await api.stop(0)
            admin = await asyncpg.connect(server_url)
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--lease-seconds", type=float, default=10.0)
    parser.add_argument("--microgrids", type=int, default=12)
    parser.add_argument("--replicas", type=int, default=3)
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()

"""CPU per transition and start lag: 10k MINUTELY dispatches over 70 s, every transition published.

Run: ``python bench/bench_minutely.py [--dispatches 10000] [--seconds 70] [--duration 30]
[--profile out.prof]``.

``dispatchd run`` as a subprocess (embedded local API, JSON logs at INFO, as in
production), seeded with ``--dispatches`` MINUTELY dispatches of ``--duration``
seconds whose starts are spread evenly over one minute, so each second about
1/60 of them start and as many stop. After the first sync's ``created``
messages are confirmed, the daemon's CPU (user + system, ``/proc``) is
measured over ``--seconds``; the consumer (this script) stamps every
``running`` message on arrival. ``--profile`` runs the daemon under cProfile
(``python -m cProfile``) and writes the profile when it stops; the CPU
figure is then not comparable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from frequenz.api.dispatch.v1.dispatch_pb2 import RecurrenceRule

sys.path.insert(0, str(Path(__file__).parent))
from bench_daemon import Daemon, bound_queue, daemon_env, quantiles, seed, show


async def bench(args: argparse.Namespace) -> None:
    exchange = f"bench-minutely-{uuid.uuid4().hex[:8]}"
    count = args.dispatches
    # In the past: the rule repeats every minute anyway, and seeding takes no margin.
    base = (datetime.now(UTC) - timedelta(minutes=2)).replace(second=0, microsecond=0)
    spacing = timedelta(seconds=60) / count
    starts = [base + spacing * i for i in range(count)]
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        seed(
            state,
            starts,
            duration=args.duration,
            recurrence=RecurrenceRule.FREQUENCY_MINUTELY,
            now=base - timedelta(minutes=1),
        )
        async with bound_queue(args.amqp_url, exchange) as consumer:
            env = daemon_env(args.amqp_url, exchange, state)
            daemon = Daemon(env)
            try:
                if args.profile:
                    await _start_profiled(daemon, args.profile)
                else:
                    await daemon.start(within=120)
                await consumer.wait_count(lambda: consumer.count("lifecycle.created") >= count, 600)
                first = datetime.now(UTC)
                cpu_before = daemon.cpu_seconds()
                await asyncio.sleep(args.seconds)
                cpu = daemon.cpu_seconds() - cpu_before
                end = first + timedelta(seconds=args.seconds)
                rss = daemon.rss_mib()
            finally:
                await daemon.stop()
        running = [
            m
            for m in consumer.messages
            if m.body["kind"] == "running"
            and first <= datetime.fromisoformat(m.body["scheduled_for"]) < end
        ]
        starts_only = [m for m in running if m.body["event"] == "running"]
        lags = [
            m.at - datetime.fromisoformat(m.body["scheduled_for"]).timestamp() for m in starts_only
        ]
        woke = [
            (
                datetime.fromisoformat(m.body["emitted_at"])
                - datetime.fromisoformat(m.body["scheduled_for"])
            ).total_seconds()
            for m in starts_only
        ]
    show("load average at the end", f"{os.getloadavg()}")
    show(f"transitions published in {args.seconds:.0f} s", f"{len(running):,}")
    show(
        f"daemon CPU over {args.seconds:.0f} s",
        f"{cpu:.2f} CPU-s = {cpu / max(1, len(running)) * 1e6:.0f} µs per transition",
        "10k: ≤ 4.5 CPU-s",
    )
    p50, p99, worst = quantiles(lags)
    show(
        "start lag at the consumer",
        f"p50 {p50:.1f} ms p99 {p99:.1f} max {worst:.1f}",
        "p99 ≤ 50 ms",
    )
    p50, p99, worst = quantiles(woke)
    show("emitted_at - scheduled_for", f"p50 {p50:.1f} ms p99 {p99:.1f} max {worst:.1f}")
    show("daemon RSS at the end", f"{rss:.0f} MiB")


async def _start_profiled(daemon: Daemon, profile: str) -> float:
    """Like ``Daemon.start`` but under cProfile (the profile is written at a clean stop)."""
    started = asyncio.get_running_loop().time()
    daemon.process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cProfile",
        "-o",
        profile,
        "-m",
        "dispatchd",
        "run",
        env=daemon.env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        limit=1 << 20,
    )
    daemon._reader = asyncio.create_task(daemon._read())
    await asyncio.wait_for(daemon.synced.wait(), 600)
    return asyncio.get_running_loop().time() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--dispatches", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=70.0)
    parser.add_argument("--duration", type=int, default=30)
    parser.add_argument("--profile", default="")
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()}", flush=True)
    await bench(args)


if __name__ == "__main__":
    asyncio.run(main())

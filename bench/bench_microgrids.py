"""A thousand microgrids in one daemon: time to ready, memory, idle CPU, update latency.

Run: ``python bench/bench_microgrids.py [--microgrids 1000] [--per 20] [--updates 100]
[--idle-seconds 60] [--server-stream-limit N] [--streams-per-channel N] [--within 600]``.

The local dispatch API runs in its own process (``dispatchd api``), as a
remote API would, seeded with ``--per`` one-off dispatches (starting tomorrow)
in each of ``--microgrids`` microgrids. ``dispatchd run`` syncs all of them:
one API stream per microgrid, ``api.max_streams_per_channel`` of them per gRPC
channel (``--streams-per-channel``; by default the daemon's own default).
``--server-stream-limit`` makes the API server allow only that many calls at
once per connection (HTTP/2 ``MAX_CONCURRENT_STREAMS``), as a proxy in front
of a real API does (HAProxy: 100, nginx: 128); without it gRPC's server
allows practically any number. Figures:
spawn -> ``/readyz`` 200 (every microgrid listed), RSS of both processes, the
daemon's CPU while idle, and one payload update on each of ``--updates``
random microgrids until the consumer (this script) gets its ``updated``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from frequenz.api.dispatch.v1.dispatch_pb2 import DispatchData
from frequenz.client.base.conversion import to_timestamp
from frequenz.client.common.microgrid import MicrogridId

sys.path.insert(0, str(Path(__file__).parent))
from bench_daemon import Daemon, bound_queue, daemon_env, quantiles, show

from dispatchd.localapi.storage import Storage
from dispatchd.localapi.validation import prepare_create


def seed(state_dir: Path, microgrids: int, per: int) -> None:
    now = datetime.now(UTC)
    start = now + timedelta(days=1)
    storage = Storage(state_dir / "dispatches.sqlite3")
    try:
        for microgrid_id in range(1, microgrids + 1):
            for index in range(per):
                data = DispatchData(type="BENCH", duration=600, is_active=True)
                data.start_time.CopyFrom(to_timestamp(start + timedelta(minutes=index)))
                data.target.component_ids.ids.extend([1, 2])
                data.payload.update({"n": index})
                storage.create(
                    microgrid_id, prepare_create(data, start_immediately=False, now=now), now
                )
    finally:
        storage.close()


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


async def wait_ready(daemon: Daemon, started: float, within: float) -> float:
    """Spawn -> /readyz 200, polled every 20 ms (a benchmark may poll)."""
    deadline = started + within
    while not daemon.http_port or await asyncio.to_thread(readyz, daemon.http_port) != 200:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"not ready within {within} s")
        if daemon.process is not None and daemon.process.returncode is not None:
            raise RuntimeError("the daemon exited")
        await asyncio.sleep(0.02)
    return time.perf_counter() - started


def synced(daemon: Daemon) -> int:
    """Microgrids whose first sync the daemon logged."""
    return sum(1 for line in daemon.log if line.get("event") == "first sync done")


def api_with_stream_limit(limit: int) -> tuple[str, ...]:
    """``python_args`` for ``dispatchd api`` whose gRPC server allows ``limit`` concurrent
    calls per connection (none: ``()``, the plain command)."""
    if not limit:
        return ()
    code = (
        "import sys; from dispatchd.localapi import server; "
        f"server._SERVER_OPTIONS.append(('grpc.max_concurrent_streams', {limit:d})); "
        "from dispatchd.cli import main; sys.argv = ['dispatchd', 'api']; raise SystemExit(main())"
    )
    return ("-c", code)


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def bench(args: argparse.Namespace) -> None:
    exchange = f"bench-microgrids-{uuid.uuid4().hex[:8]}"
    count = args.microgrids * args.per
    with tempfile.TemporaryDirectory() as api_tmp, tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        seed(Path(api_tmp), args.microgrids, args.per)
        show(
            "seeded (not measured)", f"{count:,} dispatches in {time.perf_counter() - began:.1f} s"
        )
        api = Daemon(daemon_env(args.amqp_url, exchange, Path(api_tmp)), command="api")
        await api.start(python_args=api_with_stream_limit(args.server_stream_limit))
        try:
            async with bound_queue(args.amqp_url, exchange) as consumer:
                env = daemon_env(args.amqp_url, exchange, Path(tmp))
                env["DISPATCHD_API__URL"] = f"grpc://127.0.0.1:{api.api_port}?ssl=false"
                env["DISPATCHD_API__AUTH_KEY"] = "bench"
                if args.streams_per_channel:
                    env["DISPATCHD_API__MAX_STREAMS_PER_CHANNEL"] = str(args.streams_per_channel)
                env["DISPATCHD_MICROGRID_IDS"] = (
                    f"[{','.join(map(str, range(1, args.microgrids + 1)))}]"
                )
                daemon = Daemon(env)
                started = time.perf_counter()
                spawn = daemon.start(within=args.within)
                spawned = asyncio.create_task(spawn)
                try:
                    try:
                        seconds = await wait_ready(daemon, started, args.within)
                    except TimeoutError:
                        show(
                            f"{args.microgrids} microgrids x {args.per}: spawn -> ready",
                            f"not ready within {args.within:.0f} s: "
                            f"{synced(daemon)} of {args.microgrids} microgrids synced",
                        )
                        return
                    await spawned
                    assert daemon.process is not None
                    show(
                        f"{args.microgrids} microgrids x {args.per}: spawn -> ready",
                        f"{seconds:.2f} s",
                        "≤ 10 s",
                    )
                    show("daemon RSS at ready", f"{daemon.rss_mib():.0f} MiB", "≤ 300 MiB")
                    await consumer.wait_count(lambda: len(consumer.messages) >= count, 600)
                    show(
                        f"all {count:,} created at the consumer after spawn",
                        f"{time.perf_counter() - started:.2f} s",
                    )
                    show("daemon RSS after publishing", f"{daemon.rss_mib():.0f} MiB", "≤ 300 MiB")
                    show("API process RSS", f"{api.rss_mib():.0f} MiB")
                    show("daemon open file descriptors", f"{open_files(daemon.process.pid)}")
                    if args.idle_seconds > 0:
                        before, wall = daemon.cpu_seconds(), time.monotonic()
                        await asyncio.sleep(args.idle_seconds)
                        used, wall = daemon.cpu_seconds() - before, time.monotonic() - wall
                        show(
                            f"daemon idle CPU over {wall:.0f} s",
                            f"{used:.2f} CPU-s = {100 * used / wall:.2f} %",
                            "~0",
                        )
                    ids: dict[int, list[int]] = {}
                    for message in consumer.messages:
                        dispatch = message.body["dispatch"]
                        ids.setdefault(int(message.headers["microgrid_id"]), []).append(
                            dispatch["id"]
                        )
                    rng = random.Random(1)
                    client = api.client()
                    latencies = []
                    for n, microgrid_id in enumerate(rng.sample(sorted(ids), args.updates)):
                        dispatch_id = rng.choice(ids[microgrid_id])
                        seen = len(consumer.messages)
                        sent = time.time()
                        await client.update(
                            microgrid_id=MicrogridId(microgrid_id),
                            dispatch_id=dispatch_id,  # type: ignore[arg-type]
                            new_fields={"payload": {"n": -n}},
                        )

                        def arrived(since: int = seen, wanted: int = dispatch_id) -> bool:
                            return any(
                                m.body["event"] == "updated" and m.body["dispatch"]["id"] == wanted
                                for m in consumer.messages[since:]
                            )

                        await consumer.wait_count(arrived, 30)
                        got = next(
                            m
                            for m in consumer.messages[seen:]
                            if m.body["event"] == "updated"
                            and m.body["dispatch"]["id"] == dispatch_id
                        )
                        latencies.append(got.at - sent)
                    p50, p99, worst = quantiles(latencies)
                    show(
                        f"update -> consumer, {args.updates} random microgrids",
                        f"p50 {p50:.1f} ms p99 {p99:.1f} max {worst:.1f}",
                        "p50 ≤ 5 ms",
                    )
                finally:
                    if not spawned.done():
                        spawned.cancel()
                    await daemon.stop()
        finally:
            await api.stop()
    show("load average at the end", f"{os.getloadavg()}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--microgrids", type=int, default=1000)
    parser.add_argument("--per", type=int, default=20)
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument(
        "--server-stream-limit",
        type=int,
        default=0,
        help="calls the API server allows at once per connection (0: gRPC's default)",
    )
    parser.add_argument(
        "--streams-per-channel", type=int, default=0, help="api.max_streams_per_channel"
    )
    parser.add_argument("--within", type=float, default=600.0, help="seconds to wait for ready")
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()}", flush=True)
    await bench(args)


if __name__ == "__main__":
    asyncio.run(main())

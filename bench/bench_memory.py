"""Memory of ``dispatchd run`` after its first sync: RSS and peak at 10k and 50k dispatches.

Run: ``python bench/bench_memory.py [--sizes 10000 50000] [--separate-api]
[--tracemalloc 50000] [--top 25]``.

Each size is a fresh daemon (``python -m dispatchd run`` as a subprocess,
embedded local API, as ``bench_daemon.py`` starts it) over dispatches seeded
into the API's SQLite before the spawn. Figures from ``/proc/<pid>/status``:
``VmRSS`` at ready (the ``first sync done`` log line) and again once every
initial ``created`` is confirmed (outbox 0 on ``/metrics``), and ``VmHWM``,
the peak RSS of the whole run up to then. ``--separate-api`` repeats each
size with ``dispatchd api`` in its own process, so the daemon's share is
measured without the API server's.

``--breakdown N`` runs one daemon of N dispatches in this process (seeded
from a child process) and reports its RSS at ready, after publishing, and
after each of: SQLite's caches released (``PRAGMA shrink_memory``), a full
``gc.collect()``, glibc's ``malloc_trim(0)``: how much of the RSS each holds.
This process loads its settings with pydantic, which ``dispatchd run``'s
daemon process never imports (``dispatchd.handoff``), so its RSS is about
12 MiB above a spawned daemon's.

``--tracemalloc N`` runs one daemon of N dispatches in this process with
``tracemalloc`` on (slower, and the figures include the tracer's own memory)
and prints where the live bytes are at ready, grouped by line and by type.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
from bench_daemon import Daemon, bound_queue, daemon_env, seed, show, wait_outbox_empty


def proc_status(pid: int) -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` of ``pid`` in MiB."""
    figures = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            figures[name] = int(value.split()[0]) / 1024
    return figures


def starts_for(size: int) -> list[datetime]:
    far = datetime.now(UTC) + timedelta(days=1)
    return [far + timedelta(seconds=i) for i in range(size)]


async def measure(amqp_url: str, size: int, separate_api: bool) -> dict[str, float]:
    """Prints the figures of one size and returns them: ``ready``, ``peak``, ``published``."""
    figures: dict[str, float] = {}
    exchange = f"bench-memory-{uuid.uuid4().hex[:8]}"
    label = f"{size // 1000}k" + (", API in its own process" if separate_api else "")
    with tempfile.TemporaryDirectory() as api_tmp, tempfile.TemporaryDirectory() as tmp:
        seeded = Path(api_tmp if separate_api else tmp)
        seed(seeded, starts_for(size))
        api: Daemon | None = None
        env = daemon_env(amqp_url, exchange, Path(tmp))
        if separate_api:
            api = Daemon(daemon_env(amqp_url, exchange, seeded), command="api")
            await api.start()
            env["DISPATCHD_API__URL"] = f"grpc://127.0.0.1:{api.api_port}?ssl=false"
            env["DISPATCHD_API__AUTH_KEY"] = "bench"  # the local API without keys takes any
        try:
            async with bound_queue(amqp_url, exchange) as consumer:
                daemon = Daemon(env)
                try:
                    seconds = await daemon.start()
                    assert daemon.process is not None
                    pid = daemon.process.pid
                    ready = proc_status(pid)
                    figures["ready"] = ready["VmRSS"]
                    show(f"{label}: spawn -> ready", f"{seconds:.2f} s")
                    show(
                        f"{label}: RSS at ready",
                        f"{ready['VmRSS']:.0f} MiB (peak so far {ready['VmHWM']:.0f})",
                    )
                    started = time.monotonic()
                    await consumer.wait_count(lambda: len(consumer.messages) >= size, 600)
                    await wait_outbox_empty(daemon)
                    published = time.monotonic() - started
                    after = proc_status(pid)
                    figures["published"] = after["VmRSS"]
                    figures["peak"] = after["VmHWM"]
                    show(
                        f"{label}: RSS after the created are confirmed",
                        f"{after['VmRSS']:.0f} MiB, peak {after['VmHWM']:.0f} "
                        f"({published:.1f} s to publish)",
                    )
                    if api is not None and api.process is not None:
                        show(
                            f"{label}: the API process",
                            f"{proc_status(api.process.pid)['VmRSS']:.0f} MiB",
                        )
                finally:
                    await daemon.stop()
        finally:
            if api is not None:
                await api.stop()
    return figures


async def profile(amqp_url: str, size: int, top: int) -> None:
    """One daemon in this process under tracemalloc; where the live bytes are at ready."""
    from dispatchd.config import load_config
    from dispatchd.daemon import Daemon as InProcess
    from dispatchd.logs import configure_from_settings

    exchange = f"bench-memory-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        seed(Path(tmp), starts_for(size))
        env = daemon_env(amqp_url, exchange, Path(tmp))
        env["DISPATCHD_LOG__LEVEL"] = "WARNING"
        settings = load_config(None, env)
        configure_from_settings(settings)
        # No consumer in this process (its copies would be counted).
        queue = parked_queue(amqp_url, exchange)
        await queue.__aenter__()
        tracemalloc.start(4)
        daemon = InProcess(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        await asyncio.wait_for(daemon.ready.wait(), 600)
        gc.collect()
        at_ready = tracemalloc.take_snapshot()
        traced, peak = tracemalloc.get_traced_memory()
        types_at_ready = _types()
        assert daemon.publisher is not None  # set before ready
        await daemon.publisher.wait_idle(600)
        gc.collect()
        after = tracemalloc.take_snapshot()
        traced_after, _ = tracemalloc.get_traced_memory()
        stop.set()
        await task
        tracemalloc.stop()
        await queue.__aexit__(None, None, None)
    show(
        f"tracemalloc {size}: traced at ready", f"{traced / 2**20:.1f} MiB, peak {peak / 2**20:.1f}"
    )
    show(f"tracemalloc {size}: traced after publishing", f"{traced_after / 2**20:.1f} MiB")
    print(f"\ntop {top} allocation sites at ready, with their callers:")
    for stat in at_ready.statistics("traceback")[:top]:
        where = " <- ".join(f"{_short(f.filename)}:{f.lineno}" for f in reversed(stat.traceback))
        print(f"  {stat.size / 2**20:7.2f} MiB {stat.count:>9,} blocks  {where}")
    for name, snapshot in (("at ready", at_ready), ("after publishing", after)):
        print(f"\ntop {top} lines {name}:")
        for stat in snapshot.statistics("lineno")[:top]:
            frame = stat.traceback[0]
            where = f"{_short(frame.filename)}:{frame.lineno}"
            print(f"  {stat.size / 2**20:7.2f} MiB {stat.count:>9,} blocks  {where}")
        print(f"\ntop {top} files {name}:")
        for stat in snapshot.statistics("filename")[:top]:
            frame = stat.traceback[0]
            print(
                f"  {stat.size / 2**20:7.2f} MiB {stat.count:>9,} blocks  {_short(frame.filename)}"
            )
    print(f"\nlive objects at ready by type, shallow sizes (top {top}):")
    for name, (count, size) in types_at_ready[:top]:
        print(f"  {size / 2**20:7.2f} MiB {count:>9,}  {name}")


async def breakdown(amqp_url: str, size: int) -> None:
    """An in-process daemon's RSS, then what each kind of release gives back."""
    import ctypes
    import sqlite3
    from concurrent.futures import ProcessPoolExecutor

    from dispatchd.config import load_config
    from dispatchd.daemon import Daemon as InProcess
    from dispatchd.logs import configure_from_settings

    def rss() -> str:
        figures = proc_status(os.getpid())
        return f"{figures['VmRSS']:.0f} MiB (peak {figures['VmHWM']:.0f})"

    exchange = f"bench-memory-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        with ProcessPoolExecutor(1) as pool:
            await asyncio.get_running_loop().run_in_executor(
                pool, seed, Path(tmp), starts_for(size)
            )
        env = daemon_env(amqp_url, exchange, Path(tmp))
        env["DISPATCHD_LOG__LEVEL"] = "WARNING"
        settings = load_config(None, env)
        configure_from_settings(settings)
        show(f"breakdown {size}: before the daemon", rss())
        async with parked_queue(amqp_url, exchange):
            daemon = InProcess(settings)
            stop = asyncio.Event()
            task = asyncio.create_task(daemon.run(stop))
            await asyncio.wait_for(daemon.ready.wait(), 600)
            show(f"breakdown {size}: at ready", rss())
            assert daemon.publisher is not None  # set before ready
            await daemon.publisher.wait_idle(600)
            await asyncio.sleep(1)  # let the last frees settle before reading RSS
            show(f"breakdown {size}: after publishing", rss())
            gc.collect()
            show(f"breakdown {size}: + gc.collect()", rss())
            libc = ctypes.CDLL("libc.so.6")
            libc.malloc_trim(0)
            show(f"breakdown {size}: + malloc_trim(0)", rss())
            for connection in [o for o in gc.get_objects() if isinstance(o, sqlite3.Connection)]:
                connection.execute("PRAGMA shrink_memory")
            libc.malloc_trim(0)
            show(f"breakdown {size}: + PRAGMA shrink_memory, malloc_trim(0)", rss())
            stop.set()
            await task


@contextlib.asynccontextmanager
async def parked_queue(amqp_url: str, exchange_name: str) -> AsyncIterator[None]:
    """A queue bound to everything and consumed by nobody (deleted at the end)."""
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, "#")
        yield
        await queue.delete(if_unused=False, if_empty=False)
        await channel.exchange_delete(exchange_name)
    finally:
        await connection.close()


def _types() -> list[tuple[str, tuple[int, int]]]:
    """Objects reachable from the gc-tracked ones, by type: count and shallow size."""
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    seen: set[int] = set()
    pending = gc.get_objects()
    seen.update((id(seen), id(pending), id(counts), id(sizes)))
    while pending:
        obj = pending.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        name = type(obj).__qualname__
        counts[name] += 1
        sizes[name] += sys.getsizeof(obj, 0)
        pending.extend(gc.get_referents(obj))
    return sorted(((n, (counts[n], sizes[n])) for n in counts), key=lambda x: -x[1][1])


def _short(filename: str) -> str:
    for marker in ("site-packages/", "dispatchd/", "lib/python"):
        index = filename.find(marker)
        if index >= 0:
            return filename[index:]
    return filename


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--sizes", type=int, nargs="*", default=[10000, 50000])
    parser.add_argument("--separate-api", action="store_true")
    parser.add_argument("--breakdown", type=int, default=0, metavar="N")
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="N")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()}", flush=True)
    for size in args.sizes:
        await measure(args.amqp_url, size, separate_api=False)
        if args.separate_api:
            await measure(args.amqp_url, size, separate_api=True)
    if args.breakdown:
        await breakdown(args.amqp_url, args.breakdown)
    if args.tracemalloc:
        await profile(args.amqp_url, args.tracemalloc, args.top)
    print(f"load average at the end: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())

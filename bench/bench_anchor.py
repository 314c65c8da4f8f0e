"""The anchor beside dispatchd: frequenz-dispatch 1.0.4 on the workloads of issue 16's table.

Run: ``python bench/bench_anchor.py --anchor-python PATH [--sizes 10000 50000]
[--minutely 10000] [--seconds 70] [--within 600]``.

The library is not a dependency of dispatchd, so it runs in a virtualenv of
its own, made once::

    python -m venv .anchor && .anchor/bin/pip install frequenz-dispatch==1.0.4

and passed as ``--anchor-python .anchor/bin/python``. The dispatch API is
``dispatchd api`` in its own process, seeded exactly as ``bench_memory.py``
and ``bench_minutely.py`` seed dispatchd's, and the library runs in a child
process of the anchor's Python (the script below, ``_CHILD``), as an actor
embeds it: one ``Dispatcher`` for the microgrid, one running-state receiver.

- ``N: ready / RSS``: ``Dispatcher.start()`` until ``wait_for_initialization``
  (the first list applied), then ``VmRSS`` and ``VmHWM`` of the child, for
  ``--sizes`` one-off dispatches starting tomorrow (``bench_memory.py``).
- ``MINUTELY``: ``--minutely`` every-minute dispatches of 30 s, starts spread
  over the minute (``bench_minutely.py``), measured for ``--seconds`` from
  two seconds after the first list: the child's CPU (user + system, all
  threads), the running-state changes it received, and the lag of each start
  (arrival minus the whole second it was due; dateutil, like dispatchd,
  evaluates rules at one-second resolution). In process, nothing is
  published: dispatchd's figure includes a publish with confirms per
  transition, and ``bench_minutely.py`` prints that publish's own ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from frequenz.api.dispatch.v1.dispatch_pb2 import RecurrenceRule

sys.path.insert(0, str(Path(__file__).parent))
from bench_daemon import MICROGRID, Daemon, daemon_env, quantiles, seed, show

_CHILD = r"""
import asyncio, json, sys, time
from datetime import datetime, timedelta, timezone
from frequenz.client.common.microgrid import MicrogridId
from frequenz.dispatch import Dispatcher

def status(key):
    text = open("/proc/self/status").read()
    return int(text.split(key + ":")[1].split()[0]) / 1024

async def main(config):
    began = time.perf_counter()
    dispatcher = Dispatcher(
        microgrid_id=MicrogridId(config["microgrid"]), server_url=config["url"], auth_key="bench"
    )
    dispatcher.start()
    await dispatcher.wait_for_initialization()
    out = {"ready": time.perf_counter() - began, "rss": status("VmRSS"), "peak": status("VmHWM")}
    if config["seconds"]:
        receiver = await dispatcher.new_running_state_event_receiver("BENCH")
        lags, changes, measuring = [], 0, False

        async def consume():
            nonlocal changes
            async for dispatch in receiver:
                if not measuring:
                    continue  # what the new receiver is told first: the dispatches running now
                now = datetime.now(timezone.utc)
                changes += 1
                if dispatch.started:
                    first = dispatch.start_time.replace(microsecond=0)
                    due = first + timedelta(minutes=(now - first) // timedelta(minutes=1))
                    lags.append((now - due).total_seconds())

        task = asyncio.create_task(consume())
        await asyncio.sleep(2)
        measuring = True
        cpu = time.process_time()
        await asyncio.sleep(config["seconds"])
        out["cpu"] = time.process_time() - cpu
        out["changes"] = changes
        out["lags"] = lags
        task.cancel()
    out["rss_end"] = status("VmRSS")
    print(json.dumps(out), flush=True)
    dispatcher.cancel()

asyncio.run(main(json.loads(sys.argv[1])))
"""


async def run_child(
    anchor_python: str, url: str, seconds: float, within: float
) -> dict[str, object]:
    """The child's figures; ``TimeoutError`` if its first list is not applied within ``within``."""
    config = json.dumps({"microgrid": MICROGRID, "url": url, "seconds": seconds})
    child = await asyncio.create_subprocess_exec(
        anchor_python,
        "-c",
        _CHILD,
        config,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(child.communicate(), seconds + within)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    lines = stdout.decode().strip().splitlines()
    if child.returncode not in (0, None) and not lines:
        raise RuntimeError(f"the anchor failed: {stderr.decode()[-2000:]}")
    result: dict[str, object] = json.loads(lines[-1])
    return result


async def with_api(
    seeding: Callable[[Path], None], anchor_python: str, seconds: float, within: float
) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as api_tmp:
        seeding(Path(api_tmp))
        exchange = f"bench-anchor-{uuid.uuid4().hex[:8]}"
        api = Daemon(daemon_env("amqp://unused", exchange, Path(api_tmp)), command="api")
        await api.start()
        try:
            return await run_child(
                anchor_python, f"grpc://127.0.0.1:{api.api_port}?ssl=false", seconds, within
            )
        finally:
            await api.stop()


async def memory(anchor_python: str, size: int, within: float) -> dict[str, float] | None:
    """Prints and returns the first list of ``size`` one-off dispatches: ``ready`` and
    ``peak`` RSS in MiB, ``seconds`` to it; ``None`` if not applied within ``within``."""
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    starts = [tomorrow + timedelta(seconds=index) for index in range(size)]
    label = f"anchor {size // 1000}k"
    try:
        result = await with_api(lambda state: seed(state, starts), anchor_python, 0, within)
    except TimeoutError:
        show(f"{label}: start -> first list applied", f"not within {within:.0f} s")
        return None
    show(f"{label}: start -> first list applied", f"{result['ready']:.2f} s")
    show(f"{label}: RSS at ready", f"{result['rss']:.0f} MiB (peak {result['peak']:.0f})")
    return {
        "ready": float(result["rss"]),  # type: ignore[arg-type]
        "peak": float(result["peak"]),  # type: ignore[arg-type]
        "seconds": float(result["ready"]),  # type: ignore[arg-type]
    }


async def minutely(
    anchor_python: str, count: int, seconds: float, within: float
) -> dict[str, float]:
    """Prints and returns the MINUTELY window: ``cpu``, ``p50``, ``p99`` (ms), ``changes``."""
    base = (datetime.now(UTC) - timedelta(minutes=2)).replace(second=0, microsecond=0)
    spacing = timedelta(seconds=60) / count
    starts = [base + spacing * i for i in range(count)]

    def seeding(state: Path) -> None:
        seed(
            state,
            starts,
            duration=30,
            recurrence=RecurrenceRule.FREQUENCY_MINUTELY,
            now=base - timedelta(minutes=1),
        )

    result = await with_api(seeding, anchor_python, seconds, within)
    cpu = float(result["cpu"])  # type: ignore[arg-type]
    changes = int(result["changes"])  # type: ignore[call-overload]
    lags: list[float] = result["lags"]  # type: ignore[assignment]
    label = f"anchor {count // 1000}k MINUTELY"
    show(f"{label}: running-state changes in {seconds:.0f} s", f"{changes:,}")
    show(
        f"{label}: CPU over {seconds:.0f} s",
        f"{cpu:.2f} CPU-s = {cpu / max(1, changes) * 1e6:.0f} µs per change",
    )
    p50, p99, worst = quantiles(lags) if lags else (float("nan"),) * 3
    show(f"{label}: start lag in process", f"p50 {p50:.1f} ms p99 {p99:.1f} max {worst:.1f}")
    show(f"{label}: RSS at the end", f"{result['rss_end']:.0f} MiB")
    return {"cpu": cpu, "p50": p50, "p99": p99, "changes": float(changes)}


async def bench(args: argparse.Namespace) -> None:
    for size in args.sizes:
        await memory(args.anchor_python, size, args.within)
    if args.minutely:
        await minutely(args.anchor_python, args.minutely, args.seconds, args.within)
    show("load average at the end", f"{os.getloadavg()}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--anchor-python", required=True, help="python of a venv with frequenz-dispatch"
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[10000, 50000])
    parser.add_argument("--minutely", type=int, default=10000, help="0 skips it")
    parser.add_argument("--seconds", type=float, default=70.0)
    parser.add_argument(
        "--within", type=float, default=600.0, help="seconds the first list may take"
    )
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()}", flush=True)
    await bench(args)


if __name__ == "__main__":
    asyncio.run(main())

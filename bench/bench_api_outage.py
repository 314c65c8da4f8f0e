"""How soon ``dispatchd run`` re-lists after the dispatch API comes back.

Run: ``python bench/bench_api_outage.py [--amqp-url URL] [--outage 20] [--rounds 5]``.

The API is ``dispatchd api`` in its own process. Each round kills it with
SIGKILL, waits ``--outage`` seconds, starts it again on the same port, and
measures from the moment its port first accepts a connection to the moment
the daemon (in this process) completed its re-list
(``dispatchd_api_last_sync_timestamp_seconds`` moves). Prints each delay and
their range.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

from dispatchd import metrics
from dispatchd.config import load_config
from dispatchd.daemon import Daemon

MICROGRID = 7


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_api(port: int, state: Path) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "DISPATCHD_API__LOCAL__LISTEN": f"127.0.0.1:{port}",
        "DISPATCHD_API__LOCAL__DATABASE": str(state / "api.sqlite3"),
        "DISPATCHD_STATE__DIR": str(state),
        "DISPATCHD_LOG__LEVEL": "WARNING",
    }
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatchd", "api", env=env, stdin=asyncio.subprocess.DEVNULL
    )


async def answering(url: str) -> float:
    """``time.monotonic()`` when the API's port first accepts a connection.

    Probed over TCP every 10 ms: a gRPC client here would add its own
    reconnect backoff (shared with the daemon's channel when their options
    match) to the figure. ``dispatchd api`` listens once it serves.
    """
    host, _, port = url.removeprefix("grpc://").partition("?")[0].rpartition(":")
    while True:
        try:
            _, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            await asyncio.sleep(0.01)
            continue
        writer.close()
        return time.monotonic()


def last_sync() -> float:
    value = metrics.REGISTRY.get_sample_value(
        "dispatchd_api_last_sync_timestamp_seconds", {"microgrid_id": str(MICROGRID)}
    )
    return value or 0.0


async def main(amqp_url: str, outage: float, rounds: int) -> None:
    port = free_port()
    url = f"grpc://127.0.0.1:{port}?ssl=false"
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        api = await start_api(port, state)
        await answering(url)
        env = {
            "DISPATCHD_MICROGRID_IDS": f"[{MICROGRID}]",
            "DISPATCHD_AMQP__URL": amqp_url,
            "DISPATCHD_AMQP__EXCHANGE": f"bench-outage-{uuid.uuid4().hex[:8]}",
            "DISPATCHD_STATE__DIR": str(state / "daemon"),
            "DISPATCHD_HTTP__LISTEN": "127.0.0.1:0",
            "DISPATCHD_API__URL": url,
            "DISPATCHD_LOG__LEVEL": "ERROR",
        }
        daemon = Daemon(load_config(None, env))
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        await daemon.ready.wait()
        delays = []
        try:
            for n in range(rounds):
                api.send_signal(signal.SIGKILL)
                await api.wait()
                await asyncio.sleep(outage)
                synced = last_sync()
                api = await start_api(port, state)
                back = await answering(url)
                while last_sync() <= synced:  # noqa: ASYNC110 (a metric has no event)
                    await asyncio.sleep(0.005)
                delays.append(time.monotonic() - back)
                print(f"round {n + 1}: re-listed {delays[-1]:.2f} s after the API answered")
        finally:
            stop.set()
            await task
            api.send_signal(signal.SIGKILL)
            await api.wait()
    print(
        f"{outage:g} s outage, {rounds} rounds: re-list "
        f"{min(delays):.2f}-{max(delays):.2f} s after the API answered"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--outage", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.amqp_url, args.outage, args.rounds))

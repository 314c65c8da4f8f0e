"""A burst of snapshot RPC requests plus one poisoned request against ``dispatchd run``.

Run: ``python bench/bench_rpc.py [--amqp-url URL] [--requests 5000] [--starts 200]
[--spacing-ms 25] [--rounds 1]``.

The daemon runs as a subprocess (``python -m dispatchd run``, embedded local
API), seeded with ``--starts`` one-off dispatches that start ``--spacing-ms``
apart, all inside the window of the burst. Each round runs three times, each
time with a fresh daemon:

- baseline: nobody asks for snapshots;
- control: the same burst as below, sent by the same client to a queue of its
  own that nobody serves: what the burst costs the machine (client and
  broker on the same cores) without the daemon doing anything about it;
- loaded: a client in its own process (so the two share no event loop) sends
  ``--requests`` snapshot requests at once just before the first start, with
  one more, the 11th, whose ``reply_to`` is a direct reply-to name the broker
  cannot decode (``amq.rabbitmq.reply-to.g1h2AA==.AAAA``).

Printed per run: the start lag of the ``running`` messages (consumer receive
time minus ``scheduled_for``, and the daemon's own ``emitted_at -
scheduled_for``), ``dispatchd_broker_up`` sampled from ``/metrics`` every 50 ms
until the last start and the last reply (its minimum and the share of samples at 0), how often the
daemon logged ``broker connection lost``, and how many requests got a reply,
how fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

POISONED_REPLY_TO = "amq.rabbitmq.reply-to.g1h2AA==.AAAA"
POISONED_AT = 10
"""The poisoned request is sent after this many good ones: inside the window of starts."""


# ------------------------------------------------------------ the RPC client


async def client(
    amqp_url: str, queue: str, requests: int, at: float, within: float, control: bool
) -> None:
    """Send the burst at wall time ``at``, collect the replies; JSON figures on stdout.

    ``control``: to a queue of its own that nobody serves, to measure what the
    burst costs the machine (client and broker) without the daemon answering it.
    """
    replies: dict[str, float] = {}
    errors = 0
    done = asyncio.Event()

    async def on_reply(message: AbstractIncomingMessage) -> None:
        nonlocal errors
        if message.correlation_id and message.correlation_id not in replies:
            replies[message.correlation_id] = time.time()
            if b'"error"' in message.body[:200]:
                errors += 1
            if len(replies) >= requests:
                done.set()

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        reply_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await reply_queue.consume(on_reply, no_ack=True)
        if control:
            await channel.declare_queue(queue, exclusive=True, auto_delete=True)
            within = 0
        body = json.dumps({"method": "snapshot", "microgrid_id": 7}).encode()
        await asyncio.sleep(max(0.0, at - time.time()))
        started = time.time()
        for n in range(requests + 1):
            poisoned = n == POISONED_AT
            await channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    correlation_id="poisoned" if poisoned else f"r{n}",
                    reply_to=POISONED_REPLY_TO if poisoned else reply_queue.name,
                    content_type="application/json",
                ),
                routing_key=queue,
            )
        sent = time.time() - started
        if within:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), within)
        times = sorted(at_ - started for at_ in replies.values())
        print(
            json.dumps(
                {
                    "sent_seconds": sent,
                    "replies": len(replies),
                    "errors": errors,
                    "first_reply": times[0] if times else None,
                    "last_reply": times[-1] if times else None,
                }
            ),
            flush=True,
        )


# ---------------------------------------------------------------- the bench


def sample_broker_up(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("dispatchd_broker_up "):
            return float(line.split()[1])
    return None


async def run_once(
    amqp_url: str, requests: int, starts: int, spacing: float, mode: str
) -> dict[str, Any]:
    from bench_daemon import Daemon, bound_queue, daemon_env, quantiles, seed

    margin = 8.0
    first = (datetime.now(UTC) + timedelta(seconds=margin)).replace(microsecond=0)
    instants = [first + timedelta(seconds=spacing * i) for i in range(starts)]
    window_end = instants[-1].timestamp() + 2.0
    exchange = f"bench-rpc-{uuid.uuid4().hex[:8]}"
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        seed(state, instants)
        async with bound_queue(amqp_url, exchange) as consumer:
            daemon = Daemon(daemon_env(amqp_url, exchange, state))
            try:
                await daemon.start()
                if datetime.now(UTC) >= first - timedelta(seconds=1):
                    raise RuntimeError(f"start-up took longer than the {margin} s margin")
                burst = None
                if mode != "baseline":
                    control = mode == "control"
                    burst = await asyncio.create_subprocess_exec(
                        sys.executable,
                        __file__,
                        "--client",
                        *(["--control"] if control else []),
                        "--amqp-url",
                        amqp_url,
                        "--queue",
                        f"{exchange}.control" if control else f"{exchange}.rpc",
                        "--requests",
                        str(requests),
                        "--at",
                        str(first.timestamp() - 0.1),
                        stdout=asyncio.subprocess.PIPE,
                    )
                samples: list[float] = []
                while time.time() < window_end or (burst is not None and burst.returncode is None):
                    value = await asyncio.to_thread(sample_broker_up, daemon.http_port)
                    if value is not None:
                        samples.append(value)
                    await asyncio.sleep(0.05)
                with contextlib.suppress(TimeoutError):
                    await consumer.wait_count(
                        lambda: consumer.count("running.running") >= starts, 60
                    )
                if burst is not None:
                    out, _ = await burst.communicate()
                    if mode == "loaded":
                        figures["rpc"] = json.loads(out.decode().strip().splitlines()[-1])
            finally:
                await daemon.stop()
        running = [m for m in consumer.messages if m.body["event"] == "running"]
        figures["running"] = f"{len(running)}/{starts}"
        if running:
            lags = [
                m.at - datetime.fromisoformat(m.body["scheduled_for"]).timestamp() for m in running
            ]
            woke = [
                (
                    datetime.fromisoformat(m.body["emitted_at"])
                    - datetime.fromisoformat(m.body["scheduled_for"])
                ).total_seconds()
                for m in running
            ]
            figures["lag"] = quantiles(lags)
            first_ts = first.timestamp()
            worst = sorted(
                (
                    (lag, datetime.fromisoformat(m.body["scheduled_for"]).timestamp() - first_ts)
                    for lag, m in zip(lags, running, strict=True)
                ),
                reverse=True,
            )[:3]
            figures["worst"] = ", ".join(f"{lag * 1e3:.0f} ms at +{at:.2f} s" for lag, at in worst)
            figures["woke"] = quantiles(woke)
        figures["broker_up_min"] = min(samples) if samples else None
        figures["broker_up_zero_share"] = (
            sum(1 for s in samples if s == 0) / len(samples) if samples else None
        )
        figures["connection_lost"] = sum(
            1 for line in daemon.log if line.get("event") == "broker connection lost, reconnecting"
        )
        figures["rpc_connection_lost"] = sum(
            1 for line in daemon.log if line.get("event") == "snapshot reply not delivered"
        )
    return figures


def show(name: str, figure: str) -> None:
    print(f"{name:<44} {figure}", flush=True)


def report(label: str, figures: dict[str, Any], requests: int) -> None:
    show(f"{label}: running messages", figures["running"])
    if "lag" in figures:
        p50, p99, worst = figures["lag"]
        show(f"{label}: start lag", f"p50 {p50:.1f} ms p99 {p99:.1f} max {worst:.1f}")
        p50, p99, worst = figures["woke"]
        show(
            f"{label}: emitted_at - scheduled_for",
            f"p50 {p50:.1f} ms p99 {p99:.1f} max {worst:.1f}",
        )
    if "worst" in figures:
        show(f"{label}: the 3 latest starts", figures["worst"])
    zero = figures["broker_up_zero_share"]
    show(
        f"{label}: dispatchd_broker_up",
        f"min {figures['broker_up_min']}, at 0 in {100 * zero:.0f} % of samples"
        if zero is not None
        else "no sample",
    )
    show(f"{label}: 'broker connection lost' lines", str(figures["connection_lost"]))
    rpc = figures.get("rpc")
    if rpc is not None:
        last = rpc["last_reply"]
        show(
            f"{label}: RPC replies",
            f"{rpc['replies']}/{requests} ({rpc['errors']} errors), sent in "
            f"{rpc['sent_seconds']:.2f} s, last reply after "
            + (f"{last:.2f} s" if last is not None else "-"),
        )
        show(f"{label}: replies not delivered (logged)", str(figures["rpc_connection_lost"]))


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--starts", type=int, default=200)
    parser.add_argument("--spacing-ms", type=float, default=25.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--control", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    parser.add_argument("--at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        await client(args.amqp_url, args.queue, args.requests, args.at, 60, args.control)
        return
    sys.path.insert(0, str(Path(__file__).parent))
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()}", flush=True)
    spacing = args.spacing_ms / 1000
    for round_ in range(args.rounds):
        suffix = f" #{round_ + 1}" if args.rounds > 1 else ""
        for mode, label in (
            ("baseline", "baseline"),
            ("control", "burst to an unserved queue"),
            ("loaded", f"{args.requests} requests + 1 poisoned"),
        ):
            figures = await run_once(args.amqp_url, args.requests, args.starts, spacing, mode)
            report(f"{label}{suffix}", figures, args.requests)


if __name__ == "__main__":
    asyncio.run(main())

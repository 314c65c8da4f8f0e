"""CPU per transition and start lag: 10k MINUTELY dispatches over 70 s, every transition published.

Run: ``python bench/bench_minutely.py [--dispatches 10000] [--seconds 70] [--duration 30]
[--profile out.prof] [--lean]``.

``dispatchd run`` as a subprocess (embedded local API, JSON logs at INFO, as in
production), seeded with ``--dispatches`` MINUTELY dispatches of ``--duration``
seconds whose starts are spread evenly over one minute, so each second about
1/60 of them start and as many stop. After the first sync's ``created``
messages are confirmed, the daemon's CPU (user + system, ``/proc``) is
measured over ``--seconds``; the consumer (this script) stamps every
``running`` message on arrival.

Recurring starts fall on whole seconds (rules are evaluated at one-second
resolution), so each second about 1/60 of the dispatches start and as many
stop at the same instant: a burst. The ceiling for it is measured after the
daemon stops: the window's messages (bodies, headers, properties), one
second's burst at a time, published with confirms by a bare loop to an
exchange no consumer of this process reads, twice: one aiormq
``basic_publish(wait=False)`` per message, and each burst in one write
(``dispatchd.batchpublish``, what the Publisher does). For each: this
process's CPU per message, and the time from the first publish of a burst to
its last confirm. ``--lean`` stamps arrivals in aiormq's own consumer
instead of aio-pika's (``bench_daemon.bound_queue``). ``--profile`` runs the daemon's process image
(``python -m dispatchd.handoff``) under cProfile and writes the profile when
it stops; the CPU figure is then not comparable.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import aiormq
from frequenz.api.dispatch.v1.dispatch_pb2 import RecurrenceRule

sys.path.insert(0, str(Path(__file__).parent))
from bench_daemon import (
    CLOCK_TICKS,
    Daemon,
    Received,
    bound_queue,
    daemon_env,
    quantiles,
    seed,
    show,
)

from dispatchd import handoff
from dispatchd.batchpublish import Outgoing, publish_batch
from dispatchd.config import load_config


def reference_seconds() -> float:
    """CPU seconds of a fixed pure-Python loop: how fast this (virtual) machine is right now.

    On a shared host the same loop took from 0.55 to 0.86 s within minutes; compare
    CPU figures of runs whose reference is alike, or alternate the runs compared.
    """
    started = time.process_time()
    sum(i * i for i in range(10**7))
    return time.process_time() - started


def broker_pid() -> int | None:
    """The local RabbitMQ's Erlang VM, to read its CPU (``None`` if it runs elsewhere)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "beam.smp":
                    return int(entry.name)
            except OSError:
                continue
    return None


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def bench(args: argparse.Namespace) -> dict[str, float]:
    """Prints the window's figures and returns the headline ones: ``cpu``, ``p50``, ``p99``."""
    exchange = f"bench-minutely-{uuid.uuid4().hex[:8]}"
    count = args.dispatches
    # In the past: the rule repeats every minute anyway, and seeding takes no margin.
    reference_before = reference_seconds()
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
        async with bound_queue(args.amqp_url, exchange, lean=args.lean) as consumer:
            env = daemon_env(args.amqp_url, exchange, state)
            daemon = Daemon(env)
            try:
                if args.profile:
                    await _start_profiled(daemon, args.profile)
                else:
                    await daemon.start(within=120)
                await consumer.wait_count(lambda: consumer.count("lifecycle.created") >= count, 600)
                first = datetime.now(UTC)
                user_before, system_before = daemon.cpu_times()
                broker = broker_pid()
                broker_before = process_cpu(broker) if broker else 0.0
                consumer_before = time.process_time()
                await asyncio.sleep(args.seconds)
                user, system = daemon.cpu_times()
                consumer_cpu = time.process_time() - consumer_before
                broker_cpu = process_cpu(broker) - broker_before if broker else None
                user, system = user - user_before, system - system_before
                cpu = user + system
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
        carried = [
            m.at - datetime.fromisoformat(m.body["emitted_at"]).timestamp() for m in starts_only
        ]
    show("load average at the end", f"{os.getloadavg()}")
    show(
        "reference loop at the start / end",
        f"{reference_before:.2f} s / {reference_seconds():.2f} s",
    )
    show(f"transitions published in {args.seconds:.0f} s", f"{len(running):,}")
    show(
        f"daemon CPU over {args.seconds:.0f} s",
        f"{cpu:.2f} CPU-s = {cpu / max(1, len(running)) * 1e6:.0f} µs per transition"
        f" (user {user:.2f}, system {system:.2f})",
        "10k: ≤ 4.5 CPU-s",
    )
    broker_text = "not local" if broker_cpu is None else f"{broker_cpu:.2f}"
    show(
        "CPU over the window, of every core",
        f"daemon {cpu:.2f}, broker {broker_text}, consumer (this bench) {consumer_cpu:.2f}"
        f" CPU-s, of {(os.cpu_count() or 1) * args.seconds:.0f}",
    )
    p50, p99, worst = quantiles(lags)
    headline = {"cpu": cpu, "p50": p50, "p99": p99, "transitions": float(len(running))}
    show(
        "start lag at the consumer",
        f"p50 {p50:.1f} ms p99 {p99:.1f} max {worst:.1f}",
        "p99 ≤ 50 ms",
    )
    p50, p99, worst = quantiles(woke)
    show("emitted_at - scheduled_for", f"p50 {p50:.1f} ms p99 {p99:.1f} max {worst:.1f}")
    p50, p99, worst = quantiles(carried)
    show("consumer arrival - emitted_at", f"p50 {p50:.1f} ms p99 {p99:.1f} max {worst:.1f}")
    show("daemon RSS at the end", f"{rss:.0f} MiB")
    worst_bursts: dict[str, float] = {}
    for m, lag in zip(starts_only, lags, strict=True):
        at = m.body["scheduled_for"]
        worst_bursts[at] = max(worst_bursts.get(at, 0.0), lag)
    slowest = sorted(worst_bursts.items(), key=lambda x: -x[1])[:3]
    show(
        "slowest bursts (last start at the consumer)",
        ", ".join(
            f"{(datetime.fromisoformat(at) - first).total_seconds():.0f} s into the window:"
            f" {lag * 1000:.0f} ms"
            for at, lag in slowest
        ),
    )
    if not args.no_ceiling:
        await show_ceiling(args.amqp_url, running, lean=args.lean)
    return headline


async def show_ceiling(amqp_url: str, running: list[Received], *, lean: bool) -> None:
    """The bare aiormq loop on the same messages, one second's burst at a time."""
    bursts = [
        list(burst)
        for _, burst in itertools.groupby(
            sorted(running, key=lambda m: m.body["scheduled_for"]),
            key=lambda m: m.body["scheduled_for"],
        )
    ]
    exchange_name = f"bench-minutely-bare-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(
            exclusive=True, auto_delete=True, arguments={"x-max-length": 1000}
        )
        await queue.bind(exchange_name, "#")  # routed and queued as for an actor, not read
        underlay = await channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)
        figures = {}
        gc.disable()  # as in the window: this process's collections are not the broker's
        for label, publish in (("per message", _each), ("batched", _batched)):
            seconds: list[float] = []
            cpu = time.process_time()
            for number, burst in enumerate(bursts):
                started = time.perf_counter()
                await publish(
                    underlay,
                    exchange_name,
                    [_outgoing(m, f"bare-{label}-{number}-{n}") for n, m in enumerate(burst)],
                )
                seconds.append(time.perf_counter() - started)
            figures[label] = (time.process_time() - cpu, seconds)
        gc.enable()
        await channel.exchange_delete(exchange_name)
        lags = await _batched_to_consumer(amqp_url, underlay, bursts, lean=lean)
    finally:
        await connection.close()
    sizes = sorted(len(burst) for burst in bursts)
    for label, (cpu, seconds) in figures.items():
        show(
            f"ceiling, {label}: bare aiormq publish, CPU",
            f"{cpu / len(running) * 1e6:.0f} µs per message = {cpu:.2f} CPU-s for the window",
        )
        p50, p99, worst = quantiles(seconds)
        show(
            f"ceiling, {label}: one burst ({sizes[len(sizes) // 2]} messages) to its last confirm",
            f"p50 {p50:.1f} ms p99 {p99:.1f} max {worst:.1f}",
        )
    p50, p99, worst = quantiles(lags)
    show(
        "ceiling, batched: write -> start at the consumer",
        f"p50 {p50:.1f} ms p99 {p99:.1f} max {worst:.1f}",
    )


async def _batched_to_consumer(
    amqp_url: str, underlay: aiormq.Channel, bursts: list[list[Received]], *, lean: bool
) -> list[float]:
    """Each burst in one write to a queue this process consumes, as the daemon's were:
    seconds from the write to each start's arrival. A burst goes once the last is in."""
    exchange_name = f"bench-minutely-bare-consumed-{uuid.uuid4().hex[:8]}"
    lags: list[float] = []
    async with bound_queue(amqp_url, exchange_name, lean=lean) as consumer:
        for number, burst in enumerate(bursts):
            consumer.messages.clear()
            started = time.time()
            await _batched(
                underlay,
                exchange_name,
                [_outgoing(m, f"bare-consumed-{number}-{n}") for n, m in enumerate(burst)],
            )
            size = len(burst)
            await consumer.wait_count(lambda size=size: len(consumer.messages) >= size, 30)
            lags += [m.at - started for m in consumer.messages if m.body["event"] == "running"]
            await asyncio.sleep(0.2)
    return lags


def _outgoing(message: Received, message_id: str) -> Outgoing:
    return Outgoing(
        message.routing_key,
        message.raw,
        aiormq.spec.Basic.Properties(
            content_type="application/json",
            delivery_mode=2,
            message_id=message_id,
            timestamp=datetime.now(UTC),
            message_type=message.body["kind"],
            app_id="dispatchd",
            headers=message.headers,
        ),
    )


async def _each(channel: aiormq.Channel, exchange: str, burst: list[Outgoing]) -> None:
    """One ``basic_publish(wait=False)`` per message, all in flight at once."""
    await asyncio.gather(
        *(
            channel.basic_publish(
                m.body,
                exchange=exchange,
                routing_key=m.routing_key,
                properties=m.properties,
                mandatory=True,
                wait=False,
            )
            for m in burst
        )
    )


async def _batched(channel: aiormq.Channel, exchange: str, burst: list[Outgoing]) -> None:
    """The burst in one write (``dispatchd.batchpublish``, what the Publisher does)."""
    await asyncio.gather(*await publish_batch(channel, exchange, burst, mandatory=True))


async def _start_profiled(daemon: Daemon, profile: str) -> float:
    """Like ``Daemon.start`` but under cProfile (the profile is written at a clean stop).

    ``dispatchd run`` replaces its process image once the settings are loaded
    (``dispatchd.handoff``), which would discard a profiler started with it;
    so this loads the settings here and profiles the daemon's image itself.
    """
    descriptor = handoff.settings_descriptor(load_config(None, env=daemon.env))
    try:
        return await daemon.start(
            600,
            python_args=(
                *("-m", "cProfile", "-o", profile),
                *("-m", "dispatchd.handoff", handoff.FD_OPTION, str(descriptor)),
            ),
            pass_fds=(descriptor,),
        )
    finally:
        os.close(descriptor)


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--dispatches", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=70.0)
    parser.add_argument("--duration", type=int, default=30)
    parser.add_argument("--profile", default="")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the bare publish loop")
    parser.add_argument(
        "--lean",
        action="store_true",
        help="consume with aiormq's basic_consume, not aio-pika's (see bench_daemon.bound_queue)",
    )
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()}", flush=True)
    await bench(args)


if __name__ == "__main__":
    asyncio.run(main())

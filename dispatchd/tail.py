"""``dispatchd tail``: print every message on the exchange, one line each.

For people watching a site: a private, exclusive queue bound with the given
keys, each message rendered as one readable line (or its raw JSON body with
``--json``). It decodes with the same wire code the SDK uses, so a line that
says ``undecodable`` points at a real contract violation.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import TextIO

from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import AMQPConnectionError, ChannelNotFoundEntity

from dispatchd import broker
from dispatchd.core import wire
from dispatchd.core.messages import RunningMessage
from dispatchd.settings import Settings, mask_url, redact_urls


class ExchangeMissing(Exception):
    """The exchange to tail does not exist (``tail`` never creates it)."""


def main(settings: Settings, *, bindings: list[str], raw_json: bool) -> int:
    """Entry point of ``dispatchd tail``; runs until SIGINT/SIGTERM."""
    url = settings.amqp.url.get_secret_value()
    exchange = settings.amqp.exchange
    try:
        asyncio.run(tail(url, exchange, bindings, raw_json=raw_json))
    except ExchangeMissing:
        print(
            f"dispatchd tail: exchange {exchange!r} does not exist on the broker at "
            f"{mask_url(url)}; dispatchd run declares it when it starts: start it, or set "
            "amqp.exchange to the exchange it uses",
            file=sys.stderr,
        )
        return 1
    except (AMQPConnectionError, OSError) as error:
        print(
            f"dispatchd tail: cannot reach the broker at {mask_url(url)}: "
            f"{redact_urls(str(error))}",
            file=sys.stderr,
        )
        return 1
    return 0


async def tail(
    url: str,
    exchange_name: str,
    bindings: list[str],
    *,
    raw_json: bool,
    out: TextIO = sys.stdout,
    stop: asyncio.Event | None = None,
    bound: asyncio.Event | None = None,
) -> None:
    """Print messages until ``stop`` is set (or a signal arrives when it is None)."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    connection = await broker.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        try:
            # Passive: a misspelt name must not create an exchange nobody publishes to.
            exchange = await channel.get_exchange(exchange_name, ensure=True)
        except ChannelNotFoundEntity:
            raise ExchangeMissing(exchange_name) from None
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in bindings:
            await queue.bind(exchange, routing_key=key)

        async def on_message(message: AbstractIncomingMessage) -> None:
            async with message.process():
                out.write(
                    render(message.routing_key or "", message.body, message.headers, raw_json)
                )
                out.write("\n")
                out.flush()

        await queue.consume(on_message)
        print(
            f"# tail: exchange {exchange_name!r}, bindings {', '.join(bindings)}; Ctrl-C stops",
            file=sys.stderr,
        )
        if bound is not None:
            bound.set()
        await stop.wait()


def render(routing_key: str, body: bytes, headers: object, raw_json: bool) -> str:
    """One line for one message: the decoded essentials, or the raw body."""
    if raw_json:
        return body.decode("utf-8", errors="replace")
    try:
        message = wire.decode(body, headers if isinstance(headers, dict) else None)
    except wire.WireError as error:
        return f"{routing_key}  undecodable: {error}"
    dispatch = message.dispatch
    parts = [
        wire.format_time(message.emitted_at),
        f"mg={dispatch.microgrid_id}",
        f"id={dispatch.id}",
        f"type={message.routing_type!r}",
        f"{message.kind}.{message.event}",
    ]
    if isinstance(message, RunningMessage):
        until = wire.format_time(message.until) if message.until else "-"
        lateness_ms = (message.emitted_at - message.scheduled_for).total_seconds() * 1000
        parts += [
            f"reason={message.reason}",
            f"seq={message.sequence}",
            f"occurrence={wire.format_time(message.occurrence.start)}",
            f"until={until}",
            f"late={lateness_ms:.1f}ms",
        ]
        if message.missed_runs:
            parts.append(f"missed={len(message.missed_runs)}")
    return "  ".join(parts)

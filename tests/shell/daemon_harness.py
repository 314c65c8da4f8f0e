"""Helpers for end-to-end tests of ``dispatchd run`` against real servers.

A test starts an in-process :class:`~dispatchd.daemon.Daemon` with
:func:`running_daemon` (temporary state dir, its own exchange, the embedded
local API and HTTP on port 0), watches the exchange with a
:class:`QueueObserver` bound *before* dispatches are created, and changes
dispatches through the official ``DispatchApiClient`` (:func:`api_client`)::

    async with QueueObserver(amqp_url, exchange) as observer:
        async with running_daemon(tmp_path, amqp_url, exchange) as handle:
            created = await handle.client.create(mg(), "T", soon(1), timedelta(seconds=1), ...)
            first = await observer.next(5)
            running = await observer.wait_for(lambda r: r.event == "running", 5)

Every wait takes a timeout; nothing here sleeps to synchronise. The observer
keeps every message it received (``observer.received``), decoded with
``dispatchd.core.wire.decode`` and with its AMQP properties, so tests can
check routing keys, headers and message ids as well as bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch import DispatchApiClient

from dispatchd import metrics
from dispatchd.config import load_config
from dispatchd.core import wire
from dispatchd.core.messages import RunningMessage
from dispatchd.daemon import Daemon
from dispatchd.settings import Settings

MG = 7
"""The microgrid the harness's daemon syncs unless told otherwise."""


def broker_address(amqp_url: str) -> tuple[str, int]:
    """Host and port of the test broker, for a ``TcpProxy`` in front of it."""
    parts = urlsplit(amqp_url)
    return parts.hostname or "127.0.0.1", parts.port or 5672


def proxied_amqp_url(amqp_url: str, proxy_port: int) -> str:
    """``amqp_url`` with its address replaced by a loopback proxy's."""
    parts = urlsplit(amqp_url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{proxy_port}" if credentials else f"127.0.0.1:{proxy_port}"
    return urlunsplit(parts._replace(netloc=netloc))


def mg(microgrid_id: int = MG) -> MicrogridId:
    return MicrogridId(microgrid_id)


def soon(seconds: float = 1.0) -> datetime:
    """A start time ``seconds`` from now, whole milliseconds (what the API keeps)."""
    moment = datetime.now(UTC) + timedelta(seconds=seconds)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def whole_second(seconds: float = 1.0) -> datetime:
    """The first whole second at least ``seconds`` from now.

    Recurring rules drop sub-second starts (plain ``rrule`` behaviour), so
    tests of recurrences start on whole seconds.
    """
    moment = datetime.now(UTC) + timedelta(seconds=seconds)
    return moment.replace(microsecond=0) + timedelta(seconds=1 if moment.microsecond else 0)


async def until(moment: datetime) -> None:
    """Let wall-clock time pass ``moment``: sets up a time precondition, never a sync."""
    remaining = (moment - datetime.now(UTC)).total_seconds()
    if remaining > 0:
        await asyncio.sleep(remaining + 0.01)


async def poll(predicate: Callable[[], bool], within: float = 15.0) -> None:
    """Wait for state that signals no event (outbox size, metrics); bounded."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 (observing state that has no event)
            await asyncio.sleep(0.01)


# ------------------------------------------------------------------ messages


@dataclass(frozen=True)
class Received:
    """One AMQP message as an actor sees it: decoded body plus the envelope."""

    message: wire.DecodedMessage
    routing_key: str
    message_id: str | None
    headers: Mapping[str, Any]
    content_type: str | None
    delivery_mode: int | None
    type: str | None
    app_id: str | None
    timestamp: datetime | None
    body: bytes
    arrived: float
    """``time.monotonic()`` at arrival."""

    @property
    def kind(self) -> str:
        return str(self.message.kind)

    @property
    def event(self) -> str:
        return str(self.message.event)

    @property
    def dispatch_id(self) -> int:
        return int(self.message.dispatch.id)

    @property
    def reason(self) -> str | None:
        message = self.message
        return str(message.reason) if isinstance(message, RunningMessage) else None

    @property
    def running(self) -> RunningMessage:
        """The decoded running message (fails the test for a lifecycle one)."""
        assert isinstance(self.message, RunningMessage), self
        return self.message

    def is_(self, dispatch_id: int, event: str, reason: str | None = None) -> bool:
        """This dispatch, this event, and (when given) this reason."""
        return (
            self.dispatch_id == dispatch_id
            and self.event == event
            and (reason is None or self.reason == reason)
        )

    def short(self) -> str:
        return f"{self.dispatch_id}:{self.kind}.{self.event}/{self.reason}"


def _received(message: AbstractIncomingMessage) -> Received:
    headers = dict(message.headers or {})
    return Received(
        message=wire.decode(message.body, headers),
        routing_key=message.routing_key or "",
        message_id=message.message_id,
        headers=headers,
        content_type=message.content_type,
        delivery_mode=int(message.delivery_mode) if message.delivery_mode is not None else None,
        type=message.type,
        app_id=message.app_id,
        timestamp=message.timestamp,
        body=message.body,
        arrived=time.monotonic(),
    )


BODY_KEYS = frozenset(
    {
        "schema",
        "kind",
        "event",
        "reason",
        "microgrid_id",
        "dispatch",
        "occurrence",
        "until",
        "scheduled_for",
        "emitted_at",
        "sequence",
        "running_state_change_synced",
        "missed_runs",
    }
)
"""Every key of a body (docs/messages.md § 4), present in every message."""

DISPATCH_KEYS = frozenset(
    {
        "id",
        "type",
        "start_time",
        "duration",
        "target",
        "active",
        "dry_run",
        "payload",
        "recurrence",
        "create_time",
        "update_time",
        "end_time",
    }
)


def check_envelope(received: Received) -> None:
    """Assert docs/messages.md § 3 for one message: properties, headers, id, routing key."""
    message = received.message
    assert received.content_type == wire.CONTENT_TYPE
    assert received.delivery_mode == 2
    assert received.app_id == wire.APP_ID
    assert received.timestamp is not None
    expected_type = (
        wire.TYPE_RUNNING if isinstance(message, RunningMessage) else wire.TYPE_LIFECYCLE
    )
    assert received.type == expected_type
    assert received.message_id == wire.message_id(message), received
    assert received.routing_key == wire.routing_key(message)
    body = json.loads(received.body)
    assert set(body) >= BODY_KEYS, BODY_KEYS - set(body)  # absent values are null, not missing
    assert set(body["dispatch"]) >= DISPATCH_KEYS, DISPATCH_KEYS - set(body["dispatch"])
    assert body["schema"] == wire.SCHEMA
    assert body["emitted_at"].endswith("Z")
    if isinstance(message, RunningMessage):
        assert body["scheduled_for"].endswith("Z")
    else:
        assert body["reason"] is body["occurrence"] is body["sequence"] is None
    assert dict(received.headers) == {
        "microgrid_id": message.dispatch.microgrid_id,
        "dispatch_id": message.dispatch.id,
        "dispatch_type": message.routing_type,
        "event": str(message.event),
        "schema": wire.SCHEMA,
    }


class QueueObserver:
    """An exclusive queue on the daemon's exchange that collects every message.

    It declares the (durable topic) exchange itself, so it can be bound before
    the daemon starts; ``delete_exchange`` on exit removes the test's exchange
    and the daemon's RPC queue from the broker. ``next`` hands out messages in
    arrival order; ``wait_for`` skips to the first that matches and keeps the
    skipped ones in ``received`` (every message ever received, in order).
    """

    def __init__(
        self,
        amqp_url: str,
        exchange: str,
        bindings: Iterable[str] = ("microgrid.#",),
        *,
        delete_exchange: bool = True,
    ) -> None:
        self.amqp_url = amqp_url
        self.exchange_name = exchange
        self.bindings = tuple(bindings)
        self.received: list[Received] = []
        self.errors: list[BaseException] = []
        self._cursor = 0
        self._arrived = asyncio.Condition()
        self._delete_exchange = delete_exchange
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None

    async def __aenter__(self) -> QueueObserver:
        connection = self._connection = await aio_pika.connect_robust(self.amqp_url)
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in self.bindings:
            await queue.bind(exchange, routing_key=key)
        await queue.consume(self._on_message, no_ack=True)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._delete_exchange:
            with contextlib.suppress(Exception):
                channel = await connection.channel()
                await channel.queue_delete(f"{self.exchange_name}.rpc")
                await channel.exchange_delete(self.exchange_name)
        await connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            received = _received(message)
        except wire.WireError as error:  # a contract violation: fail the test that reads on
            self.errors.append(error)
            return
        async with self._arrived:
            self.received.append(received)
            self._arrived.notify_all()

    @property
    def pending(self) -> list[Received]:
        """Received but not yet handed out by ``next``/``wait_for``."""
        return self.received[self._cursor :]

    async def next(self, timeout: float) -> Received:  # noqa: ASYNC109
        """The next message in arrival order; ``TimeoutError`` if none within ``timeout``."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.received) > self._cursor or self.errors)
        assert not self.errors, self.errors
        received = self.received[self._cursor]
        self._cursor += 1
        return received

    async def take(self, count: int, timeout: float) -> list[Received]:  # noqa: ASYNC109
        """The next ``count`` messages, all within ``timeout``."""
        async with asyncio.timeout(timeout):
            return [await self.next(timeout) for _ in range(count)]

    async def wait_for(
        self,
        predicate: Callable[[Received], bool],
        timeout: float,  # noqa: ASYNC109
    ) -> Received:
        """Skip to the first (unread) message that matches ``predicate``."""
        async with asyncio.timeout(timeout):
            while True:
                received = await self.next(timeout)
                if predicate(received):
                    return received

    async def seen(
        self,
        predicate: Callable[[Received], bool],
        timeout: float,  # noqa: ASYNC109
    ) -> Received:
        """The first message ever received that matches, waiting for it if need be.

        Unlike ``wait_for`` it looks at handed-out messages too and moves no
        cursor, so waits for several messages can come in any order.
        """
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(
                lambda: self.errors or any(predicate(r) for r in self.received)
            )
        assert not self.errors, self.errors
        return next(r for r in self.received if predicate(r))

    async def expect_quiet(self, within: float) -> None:
        """Fail if any message arrives within ``within`` seconds (a bounded wait)."""
        with contextlib.suppress(TimeoutError):
            unexpected = await self.next(within)
            raise AssertionError(f"unexpected message {unexpected.short()}: {unexpected}")

    def of(self, dispatch_id: int) -> list[Received]:
        """Every message received so far for one dispatch, in arrival order."""
        return [r for r in self.received if r.dispatch_id == dispatch_id]


# -------------------------------------------------------------------- daemon


def daemon_settings(
    state_dir: Path,
    amqp_url: str,
    exchange: str,
    *,
    microgrid_ids: Iterable[int] = (MG,),
    api_url: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> Settings:
    """Settings for a test daemon: everything on loopback port 0, state under ``state_dir``."""
    env = {
        "DISPATCHD_MICROGRID_IDS": "[" + ",".join(str(i) for i in microgrid_ids) + "]",
        "DISPATCHD_AMQP__URL": amqp_url,
        "DISPATCHD_AMQP__EXCHANGE": exchange,
        "DISPATCHD_STATE__DIR": str(state_dir),
        "DISPATCHD_HTTP__LISTEN": "127.0.0.1:0",
        "DISPATCHD_API__LOCAL__LISTEN": "127.0.0.1:0",
        "DISPATCHD_SHUTDOWN_TIMEOUT": "5",
        "DISPATCHD_LOG__LEVEL": "WARNING",
    }
    if api_url is not None:
        env["DISPATCHD_API__URL"] = api_url
    env.update(extra or {})
    return load_config(None, env)


def api_client(url: str) -> DispatchApiClient:
    """The official client against ``url`` (the local API ignores the key)."""
    return DispatchApiClient(server_url=url, auth_key="e2e-test-key")


@dataclass
class DaemonHandle:
    """A daemon running in this event loop, and a client of the API it syncs from."""

    daemon: Daemon
    settings: Settings
    stop_event: asyncio.Event
    task: asyncio.Task[None]
    client: DispatchApiClient
    stopped_in: float | None = field(default=None)

    @property
    def http_port(self) -> int:
        assert self.daemon.http_port is not None
        return self.daemon.http_port

    async def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:  # noqa: ASYNC109
        return await http_get(self.http_port, path, timeout)

    async def stop(self) -> float:
        """Stop gracefully; returns the seconds ``run`` took to return after the stop."""
        if self.stopped_in is None:
            started = time.monotonic()
            self.stop_event.set()
            await asyncio.wait_for(self.task, self.settings.shutdown_timeout + 10)
            self.stopped_in = time.monotonic() - started
        return self.stopped_in


@contextlib.asynccontextmanager
async def running_daemon(
    state_dir: Path,
    amqp_url: str,
    exchange: str,
    *,
    microgrid_ids: Iterable[int] = (MG,),
    api_url: str | None = None,
    extra: Mapping[str, str] | None = None,
    wait_ready: bool = True,
) -> AsyncIterator[DaemonHandle]:
    """Start a daemon, yield it once ready (first sync done), stop it on exit.

    With ``wait_ready=False`` it yields as soon as the API and HTTP ports are
    known (e.g. to watch /readyz while the broker is unreachable).
    """
    settings = daemon_settings(
        state_dir, amqp_url, exchange, microgrid_ids=microgrid_ids, api_url=api_url, extra=extra
    )
    daemon = Daemon(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop), name="daemon-under-test")
    try:
        if wait_ready:
            await _first_done(asyncio.create_task(daemon.ready.wait()), task, 15)
        else:
            await _until_started(daemon, task)
        assert daemon.api_url is not None
        client = api_client(daemon.api_url)
    except BaseException:
        stop.set()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, 15)
        raise
    handle = DaemonHandle(daemon, settings, stop, task, client)
    try:
        yield handle
    finally:
        await client.disconnect()
        await handle.stop()


async def _first_done(
    waiter: asyncio.Task[Any],
    daemon_task: asyncio.Task[None],
    timeout: float,  # noqa: ASYNC109
) -> None:
    """Wait for ``waiter``; a daemon that crashes meanwhile fails loudly instead."""
    done, _ = await asyncio.wait(
        {waiter, daemon_task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
    )
    if daemon_task in done:
        waiter.cancel()
        daemon_task.result()
        raise AssertionError("the daemon returned before it was ready")
    if waiter not in done:
        waiter.cancel()
        raise TimeoutError(f"daemon not ready within {timeout} s")


async def _until_started(daemon: Daemon, task: asyncio.Task[None], timeout: float = 15.0) -> None:  # noqa: ASYNC109
    """Until the HTTP server listens (the publisher has started, connected or not)."""
    async with asyncio.timeout(timeout):
        while daemon.http_port is None:
            if task.done():
                task.result()
                raise AssertionError("the daemon returned before it started")
            await asyncio.sleep(0.01)


# ---------------------------------------------------------------------- HTTP


async def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:  # noqa: ASYNC109
    """GET ``path`` from 127.0.0.1:``port`` over a raw connection: (status, body)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            response = await reader.read()
        finally:
            writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


def metric(name: str, **labels: str) -> float:
    """The current value of a ``dispatchd_`` sample in this process (0 when absent)."""
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def unique_exchange(prefix: str = "e2e") -> str:
    return f"{prefix}.{uuid.uuid4().hex[:12]}"


def check_stream(received: Iterable[Received]) -> None:
    """Invariants of any run without faults, over everything an observer saw.

    Every envelope follows docs/messages.md § 3, no message id repeats, and per
    dispatch the running sequences count 1, 2, 3, ... in arrival order with
    ``running_state_change_synced`` never going back.
    """
    received = list(received)
    for item in received:
        check_envelope(item)
    ids = [item.message_id for item in received]
    assert len(ids) == len(set(ids)), f"repeated message ids: {ids}"
    by_dispatch: dict[tuple[int, int], list[RunningMessage]] = {}
    for item in received:
        if isinstance(item.message, RunningMessage):
            key = (item.message.dispatch.microgrid_id, item.dispatch_id)
            by_dispatch.setdefault(key, []).append(item.message)
    for key, messages in by_dispatch.items():
        assert [m.sequence for m in messages] == list(range(1, len(messages) + 1)), key
        assert messages[0].running_state_change_synced is None, key
        synced = [m.running_state_change_synced for m in messages[1:]]
        assert all(s is not None for s in synced), key
        assert synced == sorted(synced), key  # type: ignore[type-var]

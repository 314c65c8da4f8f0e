"""The snapshot RPC of a running daemon (docs/messages.md § 6) over RabbitMQ.

Requests go to the default exchange with routing key ``<exchange>.rpc``, as
an actor's SDK would send them; replies come back on an exclusive queue (and
once on direct reply-to). Bad requests must get an error reply, never
silence, and must leave the daemon serving.
"""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from frequenz.client.dispatch.types import TargetIds

from dispatchd.core import wire
from dispatchd.logs import configure_logging, reset_logging
from tests.shell.daemon_harness import (
    MG,
    DaemonHandle,
    QueueObserver,
    metric,
    mg,
    running_daemon,
    soon,
)

WAIT = 15.0
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


class RpcClient:
    """Sends requests to ``<exchange>.rpc`` and matches replies by ``correlation_id``."""

    def __init__(self, amqp_url: str, exchange: str, *, direct_reply_to: bool = False) -> None:
        self._url = amqp_url
        self._queue = f"{exchange}.rpc"
        self._direct = direct_reply_to
        self._replies: dict[str, asyncio.Future[AbstractIncomingMessage]] = {}
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self.reply_to = ""

    async def __aenter__(self) -> RpcClient:
        self._connection = await aio_pika.connect(self._url)
        channel = self._channel = await self._connection.channel()
        if self._direct:
            queue = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        else:
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.consume(self._on_reply, no_ack=True)
        self.reply_to = queue.name
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._replies.get(message.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(message)

    async def send(self, body: bytes, *, reply: bool = True, reply_to: str | None = None) -> str:
        """Send one request; ``reply_to`` overrides this client's reply queue."""
        assert self._channel is not None
        correlation_id = uuid.uuid4().hex
        self._replies[correlation_id] = asyncio.get_running_loop().create_future()
        await self._channel.default_exchange.publish(
            aio_pika.Message(
                body,
                correlation_id=correlation_id,
                reply_to=(reply_to or self.reply_to) if reply else None,
                content_type=wire.CONTENT_TYPE,
            ),
            routing_key=self._queue,
        )
        return correlation_id

    async def reply(self, correlation_id: str, timeout: float = WAIT) -> AbstractIncomingMessage:  # noqa: ASYNC109
        return await asyncio.wait_for(self._replies[correlation_id], timeout)

    def answered(self, correlation_id: str) -> bool:
        return self._replies[correlation_id].done()

    async def call(self, body: bytes) -> dict[str, Any]:
        """One request, its reply body as JSON (after checking the reply's envelope)."""
        correlation_id = await self.send(body)
        message = await self.reply(correlation_id)
        assert message.correlation_id == correlation_id
        assert message.content_type == wire.CONTENT_TYPE
        parsed: dict[str, Any] = json.loads(message.body)
        assert parsed["schema"] == wire.SCHEMA
        return parsed


Site = tuple[QueueObserver, DaemonHandle, str]


@pytest.fixture
async def site(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> AsyncIterator[Site]:
    exchange = unique_name("e2e")
    async with (
        QueueObserver(amqp_url, exchange) as observer,
        running_daemon(tmp_path, amqp_url, exchange) as handle,
    ):
        yield observer, handle, exchange


async def test_snapshot_lists_the_announced_state_with_and_without_type(
    site: Site, amqp_url: str
) -> None:
    observer, handle, exchange = site
    peak = await handle.client.create(mg(), "PEAK", "NOW", timedelta(seconds=60), TargetIds(1))
    other = await handle.client.create(mg(), "OTHER", "NOW", None, TargetIds(2))
    idle = await handle.client.create(mg(), "PEAK", soon(60), timedelta(seconds=5), TargetIds(3))
    # Order holds per dispatch only: idle's created may overtake other's running.
    await observer.seen(lambda r: r.is_(int(peak.id), "running"), WAIT)
    await observer.seen(lambda r: r.is_(int(other.id), "running"), WAIT)
    await observer.seen(lambda r: r.is_(int(idle.id), "created"), WAIT)
    last_running = {r.dispatch_id: r.running for r in observer.received if r.kind == "running"}
    ok_before = metric("dispatchd_rpc_requests_total", method="snapshot", outcome="ok")
    async with RpcClient(amqp_url, exchange) as rpc:
        every = wire.decode_snapshot_reply(
            json.dumps(await rpc.call(wire.encode_snapshot_request(MG))).encode()
        )
        only_peak = wire.decode_snapshot_reply(
            json.dumps(await rpc.call(wire.encode_snapshot_request(MG, "PEAK"))).encode()
        )
    assert isinstance(every, wire.SnapshotReply) and isinstance(only_peak, wire.SnapshotReply)
    assert every.synced and only_peak.synced
    assert every.microgrid_id == MG
    by_id = {entry.dispatch.id: entry for entry in every.entries}
    assert sorted(by_id) == sorted(int(d.id) for d in (peak, other, idle))
    for running in (peak, other):
        entry, announced = by_id[int(running.id)], last_running[int(running.id)]
        assert entry.running is True
        assert (entry.until, entry.sequence) == (announced.until, announced.sequence)
        assert entry.dispatch == announced.dispatch
    assert by_id[int(other.id)].until is None  # infinite
    assert by_id[int(idle.id)].running is False
    assert by_id[int(idle.id)].until is None
    assert sorted(entry.dispatch.id for entry in only_peak.entries) == sorted(
        [int(peak.id), int(idle.id)]
    )
    assert metric("dispatchd_rpc_requests_total", method="snapshot", outcome="ok") == ok_before + 2


async def test_snapshot_over_direct_reply_to(site: Site, amqp_url: str) -> None:
    _, _, exchange = site
    async with RpcClient(amqp_url, exchange, direct_reply_to=True) as rpc:
        reply = await rpc.call(wire.encode_snapshot_request(MG))
    assert reply["synced"] is True
    assert reply["dispatches"] == []


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "malformed"),
        (b"[1, 2]", "malformed"),
        (b"\xff\xfe", "malformed"),
        (b'{"method": "restart", "microgrid_id": 7}', "unknown_method"),
        (b'{"microgrid_id": 7}', "malformed"),
        (b'{"method": "snapshot"}', "malformed"),
        (b'{"method": "snapshot", "microgrid_id": "7"}', "malformed"),
        (b'{"method": "snapshot", "microgrid_id": 7, "type": 5}', "malformed"),
        (b'{"method": "snapshot", "microgrid_id": 8}', "unknown_microgrid"),
    ],
)
async def test_bad_requests_get_error_replies_and_the_daemon_keeps_serving(
    site: Site, amqp_url: str, body: bytes, code: str
) -> None:
    _, handle, exchange = site
    async with RpcClient(amqp_url, exchange) as rpc:
        reply = await rpc.call(body)
        assert set(reply) == {"schema", "error"}, reply
        assert reply["error"]["code"] == code, reply
        assert reply["error"]["message"], reply
        assert (await rpc.call(wire.encode_snapshot_request(MG)))["synced"] is True
    assert not handle.task.done()


async def test_request_without_reply_to_is_dropped_and_serving_goes_on(
    site: Site, amqp_url: str
) -> None:
    _, handle, exchange = site
    async with RpcClient(amqp_url, exchange) as rpc:
        ok_before = metric("dispatchd_rpc_requests_total", method="snapshot", outcome="ok")
        unanswered = await rpc.send(wire.encode_snapshot_request(MG), reply=False)
        answered = await rpc.send(wire.encode_snapshot_request(MG))
        # The queue is served in order, so once the second is answered the first was handled.
        await rpc.reply(answered)
        assert not rpc.answered(unanswered)
        assert (
            metric("dispatchd_rpc_requests_total", method="snapshot", outcome="ok") == ok_before + 2
        )
    assert not handle.task.done()


POISONED_REPLY_TO = "amq.rabbitmq.reply-to.g1h2AA==.AAAA"
"""A direct reply-to name the broker cannot decode: replying to it makes RabbitMQ
close the replying connection with INTERNAL_ERROR."""


async def test_a_poisoned_reply_to_cuts_neither_publishing_nor_serving(
    site: Site, amqp_url: str
) -> None:
    observer, handle, exchange = site
    publisher = handle.daemon.publisher
    assert publisher is not None and publisher.connection is not None
    losses: list[BaseException | None] = []
    publisher.connection.close_callbacks.add(lambda _sender, exc=None: losses.append(exc))
    ok_before = metric("dispatchd_rpc_requests_total", method="snapshot", outcome="ok")
    async with RpcClient(amqp_url, exchange) as rpc:
        await rpc.send(wire.encode_snapshot_request(MG), reply_to=POISONED_REPLY_TO)
        # Served in order: this reply proves the poisoned one was handled first.
        assert (await rpc.call(wire.encode_snapshot_request(MG)))["synced"] is True
        created = await handle.client.create(mg(), "T", soon(60), None, TargetIds(1))
        await observer.wait_for(lambda r: r.is_(int(created.id), "created"), 5)
        # And again after the reply connection was cut and had to come back.
        assert (await rpc.call(wire.encode_snapshot_request(MG)))["synced"] is True
    assert losses == []
    assert publisher.connected
    assert metric("dispatchd_broker_up") == 1
    # Acked before the reply: never redelivered, so counted once, never answered again.
    assert metric("dispatchd_rpc_requests_total", method="snapshot", outcome="ok") == ok_before + 3


async def test_an_oversized_microgrid_id_gets_an_error_reply_and_no_traceback(
    site: Site, amqp_url: str
) -> None:
    _, handle, exchange = site
    out = io.StringIO()
    configure_logging("DEBUG", "json", stream=out)
    try:
        async with RpcClient(amqp_url, exchange) as rpc:
            body = b'{"method": "snapshot", "microgrid_id": ' + b"9" * 5000 + b"}"
            reply = await rpc.call(body)
            assert (await rpc.call(wire.encode_snapshot_request(MG)))["synced"] is True
    finally:
        reset_logging()
    assert reply["error"]["code"] == "malformed", reply
    assert len(reply["error"]["message"]) < 300, reply
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert not [line for line in lines if "exception" in line or "exc_info" in line], lines
    assert not handle.task.done()


async def test_a_redelivered_request_is_dropped_unanswered(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    exchange = unique_name("e2e")
    async with (
        QueueObserver(amqp_url, exchange),  # removes the RPC queue at the end
        RpcClient(amqp_url, exchange) as rpc,
    ):
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(
                f"{exchange}.rpc", durable=True, arguments={"x-message-ttl": 30_000}
            )
            first = await rpc.send(wire.encode_snapshot_request(MG))
            # Taken by a consumer that goes away without an ack: the broker requeues
            # it marked as redelivered, as after a connection cut mid-request.
            taken = await queue.get(no_ack=False, timeout=5)
            assert taken is not None and not taken.redelivered
            await channel.close()
        dropped_before = metric(
            "dispatchd_rpc_requests_total", method="unknown", outcome="redelivered"
        )
        async with running_daemon(tmp_path, amqp_url, exchange):
            answered = await rpc.send(wire.encode_snapshot_request(MG))
            await rpc.reply(answered)  # served in order: the first was handled before
            assert not rpc.answered(first)
            dropped = metric(
                "dispatchd_rpc_requests_total", method="unknown", outcome="redelivered"
            )
            assert dropped == dropped_before + 1

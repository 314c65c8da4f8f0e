"""The snapshot RPC from the actor's side (docs/messages.md)."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from dispatchd.core import wire

__all__ = ["DIRECT_REPLY_TO", "SnapshotError", "request_snapshot"]

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


class SnapshotError(RuntimeError):
    """The snapshot RPC failed: no dispatchd answered, or it answered an error."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        """``code`` is the daemon's error code when it answered with one."""
        super().__init__(message)
        self.code = code


async def request_snapshot(
    connection: AbstractConnection,
    *,
    exchange: str,
    microgrid_id: int,
    dispatch_type: str | None,
    reply_timeout: float,
) -> wire.SnapshotReply:
    """Ask ``<exchange>.rpc`` for the current state, on a channel of its own.

    The reply pseudo-queue is consumed before the request is published
    (RabbitMQ requires it); the request is mandatory, so an RPC queue that
    does not exist (no dispatchd ever ran on this exchange) fails at once.
    """
    routing_key = f"{exchange}.rpc"
    correlation_id = uuid.uuid4().hex
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[bytes] = loop.create_future()

    async def on_reply(message: AbstractIncomingMessage) -> None:
        if message.correlation_id == correlation_id and not reply.done():
            reply.set_result(message.body)

    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    try:
        replies = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await replies.consume(on_reply, no_ack=True)
        try:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    wire.encode_snapshot_request(microgrid_id, dispatch_type),
                    content_type=wire.CONTENT_TYPE,
                    correlation_id=correlation_id,
                    reply_to=DIRECT_REPLY_TO,
                    expiration=reply_timeout,
                ),
                routing_key=routing_key,
                mandatory=True,
                timeout=reply_timeout,
            )
        except aio_pika.exceptions.DeliveryError as error:
            raise SnapshotError(
                f"nobody serves the snapshot RPC queue {routing_key!r}: "
                f"is dispatchd running with exchange {exchange!r}? ({error})"
            ) from error
        try:
            async with asyncio.timeout(reply_timeout):  # not wait_for: it can lose a stop
                body = await reply
        except TimeoutError as error:
            raise SnapshotError(
                f"no snapshot reply on {routing_key!r} within {reply_timeout} s: "
                "is dispatchd running?"
            ) from error
    finally:
        if not channel.is_closed:
            await channel.close()
    try:
        decoded = wire.decode_snapshot_reply(body)
    except wire.WireError as error:
        raise SnapshotError(f"malformed snapshot reply: {error}") from error
    if isinstance(decoded, wire.ErrorReply):
        raise SnapshotError(
            f"snapshot refused by dispatchd ({decoded.code}): {decoded.message}",
            code=decoded.code,
        )
    return decoded

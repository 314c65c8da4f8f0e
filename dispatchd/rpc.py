"""Snapshot RPC (wire-v1 § 6): late-joining actors ask for the current state.

Requests arrive on the ``<exchange>.rpc`` queue; each gets exactly one reply
on its ``reply_to`` with its ``correlation_id``: the snapshot, or an error
body. Nothing a client sends can stop the consumer: every failure becomes an
error reply (or, with no ``reply_to`` to answer on, a log line).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import UTC, datetime
from typing import Final

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from dispatchd import metrics
from dispatchd.core import wire
from dispatchd.core.engine import SnapshotEntry

_log = structlog.get_logger(__name__)

_REQUEST_TTL_MS: Final = 30_000
"""Requests older than this are dropped by the broker: their asker has given up."""

Snapshot = Callable[[int, str | None], list[SnapshotEntry]]
Synced = Callable[[int], bool]


def rpc_queue_name(exchange: str) -> str:
    return f"{exchange}.rpc"


class SnapshotRpc:
    """Answers snapshot requests from the engine's announced state."""

    def __init__(
        self,
        *,
        exchange: str,
        microgrid_ids: Collection[int],
        snapshot: Snapshot,
        synced: Synced,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._queue_name = rpc_queue_name(exchange)
        self._microgrid_ids = frozenset(microgrid_ids)
        self._snapshot = snapshot
        self._synced = synced
        self._clock = clock
        self._channel: aio_pika.abc.AbstractChannel | None = None

    async def declare(self, connection: AbstractRobustConnection) -> None:
        """Declare the queue and start consuming; used as the publisher's declare hook."""
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=32)
        queue = await channel.declare_queue(
            self._queue_name, durable=True, arguments={"x-message-ttl": _REQUEST_TTL_MS}
        )
        await queue.consume(self._on_request)
        self._channel = channel
        _log.info("snapshot rpc serving", queue=self._queue_name)

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def _on_request(self, message: AbstractIncomingMessage) -> None:
        async with message.process(requeue=False, ignore_processed=True):
            body, method, outcome = self.answer(message.body)
            metrics.RPC_REQUESTS.labels(method=method, outcome=outcome).inc()
            if not message.reply_to:
                _log.warning(
                    "snapshot request without reply_to dropped",
                    message_id=message.message_id,
                    outcome=outcome,
                )
                return
            assert self._channel is not None
            await self._channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    content_type=wire.CONTENT_TYPE,
                    correlation_id=message.correlation_id,
                    app_id=wire.APP_ID,
                ),
                routing_key=message.reply_to,
            )

    def answer(self, request: bytes) -> tuple[bytes, str, str]:
        """The reply body, the method label and the outcome label for one request."""
        try:
            parsed = wire.decode_snapshot_request(request)
        except wire.WireError as error:
            method = "snapshot" if error.code != "unknown_method" else "unknown"
            return wire.encode_error_reply(error.code, str(error)), method, error.code
        if parsed.microgrid_id not in self._microgrid_ids:
            message = (
                f"microgrid {parsed.microgrid_id} is not synced by this dispatchd "
                f"(it syncs {sorted(self._microgrid_ids)})"
            )
            return wire.encode_error_reply("unknown_microgrid", message), "snapshot", "error"
        entries = [
            wire.SnapshotEntry(
                dispatch=entry.dispatch,
                running=entry.running,
                until=entry.until,
                sequence=entry.sequence,
            )
            for entry in self._snapshot(parsed.microgrid_id, parsed.type)
        ]
        body = wire.encode_snapshot_reply(
            parsed.microgrid_id, self._clock(), self._synced(parsed.microgrid_id), entries
        )
        return body, "snapshot", "ok"

"""Helpers for the store tests: envelopes, one store per backend, everything a store holds."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from dispatchd.core.records import DispatchKey
from dispatchd.core.wire import Envelope
from dispatchd.store import OutboxItem, Store

OpenStore = Callable[[], Awaitable[Store]]
"""Opens a new store on the same database each call (a restart)."""


def envelope(n: int, *, microgrid_id: int = 7, dispatch_id: int = 1) -> Envelope:
    return Envelope(
        message_id=f"msg-{microgrid_id}-{dispatch_id}-{n}",
        routing_key=f"microgrid.{microgrid_id}.running.running.T{n}",
        body=f'{{"n": {n}, "bytes": "\u00e9"}}'.encode(),
        headers={"microgrid_id": microgrid_id, "dispatch_id": dispatch_id, "event": "running"},
        type="dispatch.running",
        microgrid_id=microgrid_id,
        dispatch_id=dispatch_id,
    )


@dataclass(frozen=True, slots=True)
class Everything:
    records: dict[DispatchKey, str]
    meta: dict[int, dict[str, Any]]
    outbox: list[OutboxItem]


async def everything(store: Store) -> Everything:
    """Every stored microgrid's state, loaded one by one and put together."""
    records: dict[DispatchKey, str] = {}
    meta: dict[int, dict[str, Any]] = {}
    outbox: list[OutboxItem] = []
    for microgrid_id in sorted(await store.microgrids()):
        loaded = await store.load(microgrid_id)
        assert all(key[0] == microgrid_id for key in loaded.records)
        assert all(item.envelope.microgrid_id == microgrid_id for item in loaded.outbox)
        records.update(loaded.records)
        if loaded.meta:
            meta[microgrid_id] = loaded.meta
        outbox.extend(loaded.outbox)
    return Everything(records, meta, sorted(outbox, key=lambda item: item.seq))

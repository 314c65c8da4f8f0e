"""``dispatchd cluster status``: the replicas and the microgrid leases, read from the database.

What an operator looks at first when a cluster misbehaves: which replicas
are alive (heartbeat age), how many microgrids each owns, and every lease
with its owner, term and expiry, all timed by the database's clock. Reads
only: it never creates or migrates the schema.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, TextIO

from dispatchd.settings import ConfigError, Settings
from dispatchd.store.postgres import ClusterView, PostgresStore

EXIT_OK = 0


def main(settings: Settings, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Entry point of ``dispatchd cluster status``."""
    if settings.state.url is None:
        raise ConfigError(
            [
                (
                    "state.url",
                    "not set: the SQLite store runs one process, there is no cluster; "
                    "'dispatchd cluster status' reads a cluster's PostgreSQL database",
                )
            ]
        )
    view = asyncio.run(_read(settings.state.url.get_secret_value()))
    document = status_document(view, settings.microgrid_ids)
    out.write(json.dumps(document, indent=2) + "\n" if as_json else render(document))
    return EXIT_OK


async def _read(dsn: str) -> ClusterView:
    store = await PostgresStore.open(dsn, migrate=False, max_connections=1)
    try:
        return await store.view()
    finally:
        await store.close()


def status_document(view: ClusterView, microgrid_ids: list[int]) -> dict[str, Any]:
    """The view as plain data; configured microgrids never leased are listed too."""
    owned: dict[str, int] = {}
    leases: list[dict[str, Any]] = []
    for lease in view.leases:
        held = lease.owner is not None and lease.expires_in > 0
        if held and lease.owner is not None:
            owned[lease.owner] = owned.get(lease.owner, 0) + 1
        leases.append(
            {
                "microgrid_id": lease.microgrid_id,
                "owner": lease.owner,
                "held": held,
                "term": lease.term,
                "expires_in_seconds": _rounded(lease.expires_in),
                "previous_owner": lease.previous_owner,
            }
        )
    leased = {lease.microgrid_id for lease in view.leases}
    leases.extend(
        {
            "microgrid_id": microgrid_id,
            "owner": None,
            "held": False,
            "term": 0,
            "expires_in_seconds": None,
            "previous_owner": None,
        }
        for microgrid_id in sorted(set(microgrid_ids) - leased)
    )
    leases.sort(key=lambda lease: int(lease["microgrid_id"]))
    replicas = [
        {
            "replica_id": replica.replica_id,
            "live": replica.live,
            "heartbeat_age_seconds": _rounded(replica.heartbeat_age),
            "owned": owned.get(replica.replica_id, 0),
            "version": replica.version,
        }
        for replica in view.replicas
    ]
    return {"replicas": replicas, "leases": leases}


def render(document: dict[str, Any]) -> str:
    """Two tables for people: replicas, then leases."""
    replicas, leases = document["replicas"], document["leases"]
    live = sum(1 for replica in replicas if replica["live"])
    lines = [f"replicas: {live} live of {len(replicas)}"]
    lines += _table(
        ["REPLICA", "STATE", "HEARTBEAT", "OWNED", "VERSION"],
        [
            [
                replica["replica_id"],
                "live" if replica["live"] else "gone",
                f"{replica['heartbeat_age_seconds']:.1f} s ago",
                str(replica["owned"]),
                replica["version"] or "-",
            ]
            for replica in replicas
        ],
    )
    held = sum(1 for lease in leases if lease["held"])
    lines += ["", f"leases: {held} held, {len(leases) - held} free or expired"]
    lines += _table(
        ["MICROGRID", "OWNER", "TERM", "EXPIRES", "PREVIOUS OWNER"],
        [
            [
                str(lease["microgrid_id"]),
                lease["owner"] or "-",
                str(lease["term"]),
                _expiry(lease["expires_in_seconds"], lease["term"]),
                lease["previous_owner"] or "-",
            ]
            for lease in leases
        ],
    )
    return "\n".join(lines) + "\n"


def _expiry(seconds: float | None, term: int) -> str:
    if seconds is None:
        return "never leased" if term == 0 else "free"
    return f"in {seconds:.1f} s" if seconds > 0 else f"expired {-seconds:.1f} s ago"


def _rounded(seconds: float) -> float | None:
    """Seconds to a tenth (``-inf``, never held, as None: JSON has no infinity)."""
    return None if seconds == float("-inf") else round(seconds, 1)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=False)]
    return [
        "  "
        + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]

"""The persisted state of one dispatch and its one codec.

The store keeps one JSON text per dispatch (``DispatchRecord``) and one for
the engine as a whole (its meta). Both directions of both forms live here,
side by side: the plain dict (``record_to_json``/``record_from_json``) and
the fast text a large step writes thousands of (``record_to_text``), which
must give exactly what ``json.dumps`` of the dict gives.

Every time is written as ``wire.format_time`` writes it (RFC 3339 UTC with
``Z``), like the dispatch inside the record. Reading also accepts the
``+00:00`` times of state files written before that was so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dispatchd.core import wire
from dispatchd.core.messages import Occurrence
from dispatchd.core.model import Dispatch
from dispatchd.core.times import utc

__all__ = [
    "DispatchKey",
    "DispatchRecord",
    "last_seen_from_meta",
    "meta_to_json",
    "record_from_json",
    "record_from_text",
    "record_to_json",
    "record_to_text",
]

DispatchKey = tuple[int, int]
"""``(microgrid_id, dispatch_id)``: dispatch ids are only unique per microgrid."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchRecord:
    """The persisted state of one dispatch.

    ``announced`` is the occurrence last announced as running (``None`` when
    stopped); the runtime fields announced with it are those of ``dispatch``,
    because the engine re-announces whenever they change. ``forgotten`` marks
    a finished dispatch that fell out of the API's list: hidden, but its
    sequence and version are kept in case it comes back.
    """

    dispatch: Dispatch
    announced: Occurrence | None
    sequence: int
    last_emitted_at: datetime | None
    tombstone: bool
    pending_missed: tuple[datetime, ...] = ()
    last_pulse: datetime | None = None
    forgotten: bool = False


# ------------------------------------------------------------------ writing


def record_to_json(record: DispatchRecord) -> dict[str, Any]:
    """The record as plain JSON values."""
    announced = record.announced
    return {
        "dispatch": wire.dispatch_to_json(record.dispatch),
        "announced": (
            None
            if announced is None
            else {"start": _time(announced.start), "end": _optional_time(announced.end)}
        ),
        "sequence": record.sequence,
        "last_emitted_at": _optional_time(record.last_emitted_at),
        "tombstone": record.tombstone,
        "pending_missed": [_time(moment) for moment in record.pending_missed],
        "last_pulse": _optional_time(record.last_pulse),
        "forgotten": record.forgotten,
    }


def record_to_text(record: DispatchRecord, dispatch_text: str | None = None) -> str:
    """``json.dumps(record_to_json(record))``, compact.

    ``dispatch_text``: the dispatch's JSON as ``json.dumps`` writes it
    (ASCII, compact), when the caller has it already; the rest is written
    around it directly (numbers, booleans, null and times need no escaping).
    """
    if dispatch_text is None:
        return json.dumps(record_to_json(record), separators=(",", ":"))
    announced = record.announced
    announced_text = (
        "null"
        if announced is None
        else f'{{"start":"{_time(announced.start)}","end":{_time_text(announced.end)}}}'
    )
    missed = ",".join(f'"{_time(moment)}"' for moment in record.pending_missed)
    return (
        f'{{"dispatch":{dispatch_text},"announced":{announced_text},'
        f'"sequence":{record.sequence:d},"last_emitted_at":{_time_text(record.last_emitted_at)},'
        f'"tombstone":{wire.JSON_BOOL[record.tombstone]},"pending_missed":[{missed}],'
        f'"last_pulse":{_time_text(record.last_pulse)},'
        f'"forgotten":{wire.JSON_BOOL[record.forgotten]}}}'
    )


def meta_to_json(last_seen: datetime | None) -> dict[str, Any]:
    """The engine-wide state: the last instant the engine was told about."""
    return {"last_seen": _optional_time(last_seen)}


# ------------------------------------------------------------------ reading


def record_from_json(data: Mapping[str, Any], microgrid_id: int) -> DispatchRecord:
    """Inverse of :func:`record_to_json` (the microgrid id is the row's, not the text's)."""
    announced = data["announced"]
    return DispatchRecord(
        dispatch=wire.dispatch_from_json(data["dispatch"], microgrid_id),
        announced=(
            None
            if announced is None
            else Occurrence(
                start=_parse_time(announced["start"]),
                end=_parse_optional_time(announced["end"]),
            )
        ),
        sequence=int(data["sequence"]),
        last_emitted_at=_parse_optional_time(data["last_emitted_at"]),
        tombstone=bool(data["tombstone"]),
        pending_missed=tuple(_parse_time(text) for text in data.get("pending_missed", ())),
        last_pulse=_parse_optional_time(data.get("last_pulse")),
        forgotten=bool(data.get("forgotten", False)),
    )


def record_from_text(text: str, microgrid_id: int) -> DispatchRecord:
    """Inverse of :func:`record_to_text`."""
    return record_from_json(json.loads(text), microgrid_id)


def last_seen_from_meta(meta: Mapping[str, Any]) -> datetime | None:
    """Inverse of :func:`meta_to_json`."""
    return _parse_optional_time(meta.get("last_seen"))


# -------------------------------------------------------------------- times

_time = wire.format_time
"""The one time format written (cached: the records of one step share few instants)."""


def _optional_time(moment: datetime | None) -> str | None:
    return None if moment is None else _time(moment)


def _time_text(moment: datetime | None) -> str:
    """``_optional_time`` as JSON text."""
    return "null" if moment is None else f'"{_time(moment)}"'


def _parse_time(text: str) -> datetime:
    """A stored time: ``Z`` as written now, or ``+00:00`` as written before."""
    return utc(datetime.fromisoformat(text))


def _parse_optional_time(text: str | None) -> datetime | None:
    return None if text is None else _parse_time(text)

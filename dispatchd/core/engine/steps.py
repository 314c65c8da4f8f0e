"""What goes into the engine (a stream change) and what comes out of it (a step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dispatchd.core.messages import Message
from dispatchd.core.model import Dispatch
from dispatchd.core.records import DispatchKey, DispatchRecord


@dataclass(frozen=True, slots=True)
class Created:
    """The stream reported a new dispatch."""

    dispatch: Dispatch


@dataclass(frozen=True, slots=True)
class Updated:
    """The stream reported a new version of a dispatch."""

    dispatch: Dispatch


@dataclass(frozen=True, slots=True)
class Deleted:
    """The stream reported a dispatch deleted."""

    dispatch: Dispatch


Change = Created | Updated | Deleted


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """What one call of the engine decided, and what must be stored with it.

    The shell writes ``records`` and ``meta`` in the same transaction as the
    messages, so no change exists without its message.
    """

    messages: list[Message]
    records: dict[DispatchKey, DispatchRecord | None]
    """Every record the call changed (``None``: remove it from the store)."""
    invalid: list[tuple[DispatchKey, str]]
    """Versions found invalid in this call (each is reported once)."""
    meta: dict[str, Any]
    """The engine-wide state (see ``records.meta_to_json``)."""

"""Lifecycle events, as ``frequenz.dispatch`` names them."""

from __future__ import annotations

from dataclasses import dataclass

from dispatchd.client._dispatch import Dispatch

__all__ = ["Created", "Deleted", "DispatchEvent", "Updated"]


@dataclass(frozen=True)
class Created:
    """A dispatch was created."""

    dispatch: Dispatch


@dataclass(frozen=True)
class Updated:
    """A dispatch was updated (``dispatch`` is the new version)."""

    dispatch: Dispatch


@dataclass(frozen=True)
class Deleted:
    """A dispatch was deleted (``dispatch.deleted`` is true)."""

    dispatch: Dispatch


DispatchEvent = Created | Updated | Deleted
"""What ``Dispatcher.lifecycle_events`` delivers."""

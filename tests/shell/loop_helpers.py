"""Helpers for the tests of ``dispatchd.loop``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dispatchd.store import OutboxItem


class SubmittedOnly:
    """Counts what the loop hands to the publisher (a real one would count it in
    the process-wide outbox gauge and leave it there)."""

    def __init__(self) -> None:
        self.submitted = 0

    def submit(self, items: Sequence[OutboxItem], bulk: Any = None) -> None:
        self.submitted += len(items)

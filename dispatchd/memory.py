"""Give the heap memory freed by bulk work back, and keep long-lived objects out of the GC.

After a first sync of tens of thousands of dispatches, most of what it
allocated is freed again (texts, envelopes, list pages), but glibc's
allocator keeps the freed pages of its heap mapped: the process would stay
at its peak. ``malloc_trim(0)`` returns them (docs/architecture.md, "Memory
at scale"). Elsewhere (musl, macOS) it is a no-op.

The engine's state (hundreds of thousands of objects at 50k dispatches)
lives as long as the process. Left to itself, Python's cyclic collector
walks all of it in every full collection: 65 ms at 10k dispatches, taken at
whatever instant the allocation counters say, in the middle of a burst of
starts as often as not. ``settle`` runs that full collection at a moment the
publisher has nothing to do and then freezes what survived
(``gc.freeze``), so the collections that follow walk only what is newer.
"""

from __future__ import annotations

import ctypes
import gc
import time
from collections.abc import Callable

import structlog

_log = structlog.get_logger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


_MALLOC_TRIM = _malloc_trim()


def trim() -> None:
    """Return the free pages of the heap to the operating system (glibc only)."""
    if _MALLOC_TRIM is None:
        return
    started = time.perf_counter()
    _MALLOC_TRIM(0)
    _log.debug("heap trimmed", seconds=round(time.perf_counter() - started, 4))


def settle() -> None:
    """One full collection now, then move its survivors out of later collections.

    Unfrozen first, so what was frozen last time and is garbage now (a
    cycle dropped since) is collected rather than kept for good.
    """
    started = time.perf_counter()
    gc.unfreeze()
    collected = gc.collect()
    gc.freeze()
    _log.debug(
        "long-lived objects frozen",
        objects=gc.get_freeze_count(),
        collected=collected,
        seconds=round(time.perf_counter() - started, 4),
    )

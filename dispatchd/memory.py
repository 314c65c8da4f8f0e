"""Give the heap memory freed by bulk work back to the operating system.

After a first sync of tens of thousands of dispatches, most of what it
allocated is freed again (texts, envelopes, list pages), but glibc's
allocator keeps the freed pages of its heap mapped: the process would stay
at its peak. ``malloc_trim(0)`` returns them (docs/architecture.md, "Memory
at scale"). Elsewhere (musl, macOS) it is a no-op.
"""

from __future__ import annotations

import ctypes
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

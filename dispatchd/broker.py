"""Opening a robust broker connection that never outlives a failed or cancelled attempt.

``aio_pika.connect_robust`` starts the connection's own reconnecting task
before the first attempt completes. If that attempt fails or the caller is
cancelled meanwhile (dispatchd stopping while the broker refuses its login or
does not answer), ``connect_robust`` raises but the task goes on retrying
forever, held by nobody: it kept a stopped daemon's event loop from closing.
``connect_robust`` here closes the connection whenever the first attempt does
not return it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aio_pika.connection import make_url

CLOSE_WITHIN = 5.0
"""Seconds a connection whose first attempt failed gets to close."""


async def connect_robust(
    url: str,
    *,
    timeout: float | None = None,  # noqa: ASYNC109 (the first attempt's, as aio-pika's)
    client_properties: dict[str, Any] | None = None,
    **kwargs: Any,
) -> AbstractRobustConnection:
    """``aio_pika.connect_robust(url, ...)``, closed again if it raises or is cancelled."""
    connection = aio_pika.RobustConnection(
        make_url(url, **kwargs), client_properties=client_properties, **kwargs
    )
    try:
        await connection.connect(timeout=timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_WITHIN):
                await connection.close()
        raise
    return connection

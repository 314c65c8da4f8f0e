"""Waiting on SDK receivers with timeouts (never sleeping to synchronise)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

from frequenz.channels import Receiver
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.types import Dispatch as ClientDispatch
from frequenz.client.dispatch.types import TargetIds

from dispatchd.client import Dispatch
from tests.shell.daemon_harness import mg, soon

T = TypeVar("T")


async def take(receiver: Receiver[T], count: int, timeout: float = 10.0) -> list[T]:  # noqa: ASYNC109
    """The next ``count`` messages, all within ``timeout``."""
    async with asyncio.timeout(timeout):
        return [await receiver.receive() for _ in range(count)]


async def take_until(
    receiver: Receiver[T],
    done: Callable[[list[T]], bool],
    timeout: float = 10.0,  # noqa: ASYNC109
) -> list[T]:
    """Messages until ``done(received)`` holds, within ``timeout``."""
    received: list[T] = []
    async with asyncio.timeout(timeout):
        while not done(received):
            received.append(await receiver.receive())
    return received


async def expect_quiet(receiver: Receiver[T], within: float) -> None:
    """Fail if anything arrives within ``within`` seconds (a bounded wait)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            unexpected = await receiver.receive()
        raise AssertionError(f"unexpected message: {unexpected}")


def states(dispatches: list[Dispatch], type: str = "T") -> list[tuple[int, str]]:
    """(id, RUNNING/STOPPED/DIFFERENT_TYPE) as an actor of ``type`` reads them."""
    return [(d.id, d.running(type).name) for d in dispatches]


async def create(
    client: DispatchApiClient,
    type: str = "T",
    *,
    start_in: float = 0.5,
    duration: float | None = 1.0,
    dry_run: bool = False,
    payload: dict[str, object] | None = None,
) -> ClientDispatch:
    """A dispatch of microgrid 7 starting ``start_in`` seconds from now."""
    return await client.create(
        mg(),
        type,
        soon(start_in),
        None if duration is None else timedelta(seconds=duration),
        TargetIds(1, 2),
        dry_run=dry_run,
        payload=payload or {},
    )

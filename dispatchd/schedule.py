"""``dispatchd schedule``: the occurrences the daemon would run in a window.

It lists the microgrid's dispatches from the configured API (the local API's
address when ``api.url`` is unset) and expands them with the daemon's own
``core.recurrence.Schedule``, so what it prints is what the daemon does.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TextIO

import grpc
from frequenz.client.common.microgrid import MicrogridId

from dispatchd.apisync import api_client
from dispatchd.config import Settings
from dispatchd.core import wire
from dispatchd.core.model import Dispatch
from dispatchd.core.recurrence import Invalid, Schedule


def main(
    settings: Settings,
    *,
    microgrid_id: int,
    start: datetime,
    end: datetime,
    dispatch_type: str | None,
) -> int:
    """Entry point of ``dispatchd schedule``."""
    try:
        dispatches = asyncio.run(_list(settings, microgrid_id))
    except grpc.aio.AioRpcError as error:
        print(
            f"dispatchd schedule: the dispatch API failed: {error.code().name}: {error.details()}",
            file=sys.stderr,
        )
        return 1
    if dispatch_type is not None:
        dispatches = [d for d in dispatches if d.type == dispatch_type]
    print_schedule(dispatches, start, end, sys.stdout, sys.stderr)
    return 0


def print_schedule(
    dispatches: Iterable[Dispatch], start: datetime, end: datetime, out: TextIO, err: TextIO
) -> None:
    """One line per occurrence, by start then dispatch id; invalid ones to ``err``."""
    out.write("# start                     end                       dispatch  type\n")
    for occurrence_start, occurrence_end, dispatch in sorted(
        _occurrences(dispatches, start, end, err), key=lambda row: (row[0], row[2].id)
    ):
        end_text = wire.format_time(occurrence_end) if occurrence_end else "never"
        out.write(
            f"{wire.format_time(occurrence_start):<26}  {end_text:<24}  "
            f"{dispatch.id:>8}  {dispatch.type}"
            f"{'' if dispatch.active else '  (inactive: will not run)'}\n"
        )


def _occurrences(
    dispatches: Iterable[Dispatch], start: datetime, end: datetime, err: TextIO
) -> Iterator[tuple[datetime, datetime | None, Dispatch]]:
    """Occurrences overlapping ``[start, end)``, including one already running at start."""
    for dispatch in dispatches:
        schedule = Schedule.build(dispatch)
        if isinstance(schedule, Invalid):
            err.write(
                f"dispatch {dispatch.id} ({dispatch.type}): invalid, never runs: "
                f"{schedule.reason}\n"
            )
            continue
        for occurrence_start, occurrence_end in occurrences(schedule, start, end):
            yield occurrence_start, occurrence_end, dispatch


async def _list(settings: Settings, microgrid_id: int) -> list[Dispatch]:
    client = api_client(settings)
    try:
        result: list[Dispatch] = []
        async for page in client.list(MicrogridId(microgrid_id)):
            result.extend(Dispatch.from_client(d, microgrid_id) for d in page)
        return result
    finally:
        await client.disconnect()


def occurrences(
    schedule: Schedule, start: datetime, end: datetime
) -> Iterator[tuple[datetime, datetime | None]]:
    """(start, end) of each occurrence overlapping ``[start, end)``, in order, including
    one already running at ``start``; end ``None``: it never ends.

    ``dispatchd schedule`` and the status page (``timelines``) both show this,
    so they agree with each other and with the daemon.
    """
    running = schedule.occurrence_at(start)
    if running is not None and running.start < start:
        yield running.start, running.end
    for occurrence in schedule.occurrences_between(start, end):
        yield occurrence.start, occurrence.end


@dataclass(frozen=True, slots=True)
class Timeline:
    """One dispatch in a window: its occurrences, or why it never runs."""

    dispatch: Dispatch
    occurrences: tuple[tuple[datetime, datetime | None], ...]
    invalid: str | None = None
    truncated: bool = False
    """It has more occurrences than the ``limit`` given to ``timelines``."""


def timelines(
    dispatches: Iterable[Dispatch], start: datetime, end: datetime, *, limit: int
) -> Iterator[Timeline]:
    """Each dispatch's ``occurrences`` in the window, at most ``limit`` of them.

    The limit keeps a minutely rule over a long window from stalling the caller.
    """
    for dispatch in dispatches:
        schedule = Schedule.build(dispatch)
        if isinstance(schedule, Invalid):
            yield Timeline(dispatch, (), schedule.reason)
            continue
        found: list[tuple[datetime, datetime | None]] = []
        for occurrence in occurrences(schedule, start, end):
            if len(found) == limit:
                yield Timeline(dispatch, tuple(found), None, truncated=True)
                break
            found.append(occurrence)
        else:
            yield Timeline(dispatch, tuple(found))

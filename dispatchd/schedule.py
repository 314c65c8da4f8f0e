"""``dispatchd schedule``: the occurrences the daemon would run in a window.

It lists the microgrid's dispatches from the configured API (the local API's
address when ``api.url`` is unset) and expands them with the daemon's own
``core.recurrence.Schedule``, so what it prints is what the daemon does.
"""

from __future__ import annotations

import asyncio
import heapq
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TextIO

import grpc
from frequenz.client.common.microgrid import MicrogridId

from dispatchd.apisync import api_client
from dispatchd.core import wire
from dispatchd.core.model import Dispatch
from dispatchd.core.recurrence import Invalid, Schedule
from dispatchd.settings import Settings

EXIT_USAGE = 2


def main(
    settings: Settings,
    *,
    microgrid_id: int,
    start: datetime,
    end: datetime,
    dispatch_type: str | None,
    limit: int,
) -> int:
    """Entry point of ``dispatchd schedule``."""
    if microgrid_id not in settings.microgrid_ids:
        configured = ", ".join(str(mid) for mid in settings.microgrid_ids)
        print(
            f"dispatchd schedule: microgrid {microgrid_id} is not one the daemon syncs "
            f"(microgrid_ids: {configured}); it would run nothing for it",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        dispatches = asyncio.run(_list(settings, microgrid_id))
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            print(
                f"dispatchd schedule: the dispatch API does not know microgrid {microgrid_id}: "
                f"{error.details()}",
                file=sys.stderr,
            )
            return EXIT_USAGE
        print(
            f"dispatchd schedule: the dispatch API failed: {error.code().name}: {error.details()}",
            file=sys.stderr,
        )
        return 1
    if dispatch_type is not None:
        dispatches = [d for d in dispatches if d.type == dispatch_type]
    print_schedule(dispatches, start, end, sys.stdout, sys.stderr, limit=limit)
    return 0


def print_schedule(
    dispatches: Iterable[Dispatch],
    start: datetime,
    end: datetime,
    out: TextIO,
    err: TextIO,
    *,
    limit: int | None = None,
) -> bool:
    """One line per occurrence, by start then dispatch id, at most ``limit`` (None: all).

    Invalid dispatches are reported to ``err``, and so is a cut. Occurrences
    are generated lazily and merged in order, so a long window of a minutely
    rule costs ``limit`` rows, not all of them. Returns whether rows were cut.
    """
    out.write("# start                     end                       dispatch  type\n")
    rows = heapq.merge(
        *(_occurrences(dispatch, start, end, err) for dispatch in dispatches),
        key=lambda row: (row[0], row[2].id),
    )
    for shown, (occurrence_start, occurrence_end, dispatch) in enumerate(rows):
        if shown == limit:
            err.write(
                f"# cut after {limit} occurrences (at {wire.format_time(occurrence_start)}): "
                "narrow the window with --from/--to or --type, or raise --limit\n"
            )
            return True
        end_text = wire.format_time(occurrence_end) if occurrence_end else "never"
        out.write(
            f"{wire.format_time(occurrence_start):<26}  {end_text:<24}  "
            f"{dispatch.id:>8}  {dispatch.type}"
            f"{'' if dispatch.active else '  (inactive: will not run)'}\n"
        )
    return False


def _occurrences(
    dispatch: Dispatch, start: datetime, end: datetime, err: TextIO
) -> Iterator[tuple[datetime, datetime | None, Dispatch]]:
    """Its occurrences overlapping ``[start, end)`` in order, including one running at start."""
    schedule = Schedule.build(dispatch)
    if isinstance(schedule, Invalid):
        err.write(
            f"dispatch {dispatch.id} ({dispatch.type}): invalid, never runs: {schedule.reason}\n"
        )
        return
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

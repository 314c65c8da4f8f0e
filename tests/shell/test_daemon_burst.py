"""Bursts of due transitions: readied ahead, committed and published in parts.

Shortly before a deadline the daemon encodes the dispatches due (``_prepare``);
a change made after that must still be published with its new data.
``Loop._commit_in_parts`` cuts a burst so the first messages are on the wire
while the rest are still encoded and committed. These tests pin the cutting
rule (``_parts``), a burst split into several parts end to end, and a crash
between two parts: the restart must converge the dispatches of the later
parts without losing or re-numbering any transition.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from frequenz.client.dispatch.types import TargetIds
from hypothesis import given
from hypothesis import strategies as st

from dispatchd import loop as loop_module
from dispatchd.core.messages import Message
from dispatchd.core.wire import TYPE_RUNNING, Envelope
from dispatchd.daemon import Daemon
from dispatchd.loop import Loop, _parts
from dispatchd.store import OutboxItem, Store
from tests.shell.daemon_harness import (
    MG,
    DaemonHandle,
    QueueObserver,
    Received,
    api_client,
    check_stream,
    daemon_settings,
    mg,
    running_daemon,
    whole_second,
)

WAIT = 15.0


@dataclass(frozen=True)
class _Dispatch:
    microgrid_id: int
    id: int


@dataclass(frozen=True)
class _Message:
    dispatch: _Dispatch
    n: int


def _fake(keys: Sequence[tuple[int, int]]) -> list[Message]:
    return cast(list[Message], [_Message(_Dispatch(*key), n) for n, key in enumerate(keys)])


def _key(message: Message) -> tuple[int, int]:
    return message.dispatch.microgrid_id, message.dispatch.id


@given(
    st.lists(st.tuples(st.integers(1, 2), st.integers(1, 12)), max_size=80),
    st.integers(1, 10),
    st.none() | st.integers(0, 81),
)
def test_parts_keep_order_and_never_split_a_dispatch(
    keys: list[tuple[int, int]], first: int, cut_before: int | None
) -> None:
    messages = _fake(keys)
    parts = _parts(messages, first, cut_before=cut_before)
    assert [m for part in parts for m in part] == messages
    assert all(parts)
    owner: dict[tuple[int, int], int] = {}
    for index, part in enumerate(parts):
        for message in part:
            assert owner.setdefault(_key(message), index) == index
    ends = list(itertools.accumulate(len(part) for part in parts))
    for index, part in enumerate(parts[:-1]):
        assert len(part) >= first * 2**index or ends[index] == cut_before
    if cut_before is not None and 0 < cut_before < len(messages):
        before = {_key(m) for m in messages[:cut_before]}
        if before.isdisjoint(_key(m) for m in messages[cut_before:]):
            assert cut_before in ends  # a cut may be made there, so it is


def test_one_message_per_dispatch_gives_doubling_parts() -> None:
    messages = _fake([(1, n) for n in range(15)])
    assert [len(part) for part in _parts(messages, 2)] == [2, 4, 8, 1]


def test_the_stops_begin_a_part_of_their_own() -> None:
    # Parts of 2, 4, ...; the stops begin at index 3 (the fourth message).
    messages = _fake([(1, n) for n in range(7)])
    assert [len(part) for part in _parts(messages, 2, cut_before=3)] == [2, 1, 4]


def test_a_dispatch_with_two_messages_far_apart_keeps_its_part_whole() -> None:
    # Starts before stops: dispatch 1 pulses (running first, stopped last).
    messages = _fake([(1, 1), (1, 2), (1, 3), (1, 4), (1, 1)])
    assert [len(part) for part in _parts(messages, 1)] == [5]


async def _until_running(observer: QueueObserver, count: int) -> list[Received]:
    """Wait for ``count`` running messages; returns every running message so far."""

    def running() -> list[Received]:
        return [r for r in observer.received if r.event == "running"]

    await observer.seen(lambda _: len(running()) >= count, WAIT)
    return running()


class _CommitSpy:
    """Wraps ``Store.commit``: counts the commits that carry running messages, can fail one."""

    def __init__(self, store: Store, fail_at: int | None = None) -> None:
        self.running_commits: list[int] = []
        self._commit = store.commit
        self._fail_at = fail_at

    async def __call__(self, **kwargs: Any) -> list[OutboxItem]:
        envelopes: Sequence[Envelope] = kwargs.get("envelopes", ())
        running = sum(1 for envelope in envelopes if envelope.type == TYPE_RUNNING)
        if running:
            self.running_commits.append(running)
            if len(self.running_commits) == self._fail_at:
                raise OSError("disk unplugged between two parts")
        return await self._commit(**kwargs)


async def _create_starting_together(client: Any, count: int, seconds: float) -> list[int]:
    start = whole_second(seconds)
    created = [
        await client.create(mg(), "BURST", start, timedelta(seconds=30), TargetIds(n))
        for n in range(count)
    ]
    return sorted(int(dispatch.id) for dispatch in created)


@pytest.fixture
async def in_parts_of_two(
    amqp_url: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[QueueObserver, DaemonHandle, _CommitSpy]]:
    """A running daemon whose bursts start with a part of 2, its commits spied on."""
    monkeypatch.setattr(loop_module, "FIRST_PART", 2)
    exchange = unique_name("parts")
    async with (
        QueueObserver(amqp_url, exchange) as observer,
        running_daemon(tmp_path, amqp_url, exchange) as handle,
    ):
        assert handle.daemon.store is not None
        spy = _CommitSpy(handle.daemon.store)
        monkeypatch.setattr(handle.daemon.store, "commit", spy)
        yield observer, handle, spy


async def test_a_burst_is_published_in_parts(
    in_parts_of_two: tuple[QueueObserver, DaemonHandle, _CommitSpy],
) -> None:
    observer, handle, spy = in_parts_of_two
    ids = await _create_starting_together(handle.client, 7, 2)
    running = await _until_running(observer, len(ids))
    assert sorted(r.dispatch_id for r in running) == ids
    assert [r.dispatch_id for r in running] == ids  # one part after the other, by id
    assert spy.running_commits == [2, 4, 1]
    assert {r.running.scheduled_for for r in running} == {running[0].running.occurrence.start}
    assert handle.daemon.publisher is not None and handle.daemon.store is not None
    assert await handle.daemon.publisher.wait_idle(WAIT)
    assert await handle.daemon.store.outbox() == []
    check_stream(observer.received)


async def test_a_burst_commits_its_starts_in_parts_before_the_stops(
    in_parts_of_two: tuple[QueueObserver, DaemonHandle, _CommitSpy],
) -> None:
    observer, handle, spy = in_parts_of_two
    first = whole_second(3)
    second = first + timedelta(seconds=1)
    ending = [
        int((await handle.client.create(mg(), "ENDS", first, timedelta(seconds=1), t)).id)
        for t in (TargetIds(1), TargetIds(2), TargetIds(3))
    ]
    starting = [
        int((await handle.client.create(mg(), "STARTS", second, timedelta(seconds=30), t)).id)
        for t in (TargetIds(4), TargetIds(5), TargetIds(6))
    ]
    assert datetime.now(UTC) < first, "created too late for the first instant"
    last = (ending[-1], "running", "stopped")
    await observer.seen(lambda r: (r.dispatch_id, r.kind, r.event) == last, WAIT)
    running = [r for r in observer.received if r.kind == "running"]
    assert [(r.dispatch_id, r.event) for r in running] == [
        *((d, "running") for d in ending),
        *((d, "running") for d in starting),
        *((d, "stopped") for d in ending),
    ]
    # The first instant: 3 starts in parts of 2 and 1. The second: 3 starts
    # cut where the stops begin (2, 1), then the 3 stops.
    assert spy.running_commits == [2, 1, 2, 1, 3]
    check_stream(observer.received)


async def test_a_crash_between_parts_loses_nothing(
    amqp_url: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loop_module, "FIRST_PART", 2)
    exchange = unique_name("parts-crash")
    async with QueueObserver(amqp_url, exchange) as observer:
        settings = daemon_settings(tmp_path, amqp_url, exchange)
        first = Daemon(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(first.run(stop))
        await asyncio.wait_for(first.ready.wait(), WAIT)
        assert first.store is not None and first.api_url is not None
        spy = _CommitSpy(first.store, fail_at=2)
        monkeypatch.setattr(first.store, "commit", spy)
        client = api_client(first.api_url)
        try:
            ids = await _create_starting_together(client, 5, 2)
            with pytest.raises(OSError, match="between two parts"):
                await asyncio.wait_for(task, WAIT)
        finally:
            await client.disconnect()
            stop.set()
            with contextlib.suppress(BaseException):
                await task
        assert spy.running_commits == [2, 3]  # the second part never committed

        async with running_daemon(tmp_path, amqp_url, exchange) as handle:
            await _until_running(observer, len(ids))
            await observer.take(len(observer.pending), WAIT)
            await observer.expect_quiet(1.0)
            assert handle.daemon.store is not None
            assert handle.daemon.publisher is not None
            assert await handle.daemon.publisher.wait_idle(WAIT)

    running = [r for r in observer.received if r.event == "running"]
    by_dispatch = {r.dispatch_id: r for r in running}
    assert sorted(by_dispatch) == ids
    assert len({r.message_id for r in running}) == len(running) == len(ids)
    reasons = {r.dispatch_id: r.reason for r in running}
    assert [reasons[d] for d in ids] == ["started", "started", "resumed", "resumed", "resumed"]
    start = by_dispatch[ids[0]].running.occurrence.start
    for item in running:
        # Dated at the boundary that passed during the crash, numbered 1 like the others.
        assert (item.running.scheduled_for, item.running.sequence) == (start, 1)
        assert item.message.dispatch.microgrid_id == MG
    check_stream(observer.received)


async def test_a_change_after_the_dispatch_was_readied_is_published_as_changed(
    amqp_url: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    readied = asyncio.Event()
    prepare = Loop._prepare

    def spy(self: Loop) -> None:
        prepare(self)
        if self._prepared:
            readied.set()

    monkeypatch.setattr(Loop, "_prepare", spy)
    exchange = unique_name("prepared")
    async with (
        QueueObserver(amqp_url, exchange) as observer,
        running_daemon(tmp_path, amqp_url, exchange) as handle,
    ):
        start = whole_second(1.5)
        created = await handle.client.create(
            mg(), "READIED", start, timedelta(seconds=30), TargetIds(1), payload={"v": 1}
        )
        await asyncio.wait_for(readied.wait(), WAIT)
        assert datetime.now(UTC) < start, "readied too late to test a change after it"
        await handle.client.update(
            microgrid_id=mg(), dispatch_id=created.id, new_fields={"payload": {"v": 2}}
        )
        got = await observer.take(3, WAIT)
        assert [r.short() for r in got] == [
            f"{int(created.id)}:lifecycle.created/None",
            f"{int(created.id)}:lifecycle.updated/None",
            f"{int(created.id)}:running.running/started",
        ]
        assert got[2].message.dispatch.payload == {"v": 2}
        assert got[2].running.scheduled_for == start
    check_stream(observer.received)

"""Crash tests: ``python -m dispatchd run`` killed with SIGKILL and restarted.

Each test runs the daemon as a subprocess on a fresh state dir (the embedded
local API's SQLite lives there too, so dispatches survive), with a queue bound
to a unique exchange before the first start. After every kill the daemon is
restarted on the same state dir, and the whole history seen on the queue is
checked against the wire contract: no transition lost, duplicates only with
identical ``message_id`` and body, every dispatch ``created`` exactly once,
per-dispatch ``sequence`` numbers 1, 2, 3... in order.

What is testable about downtime: a recurring dispatch whose occurrence began
and ended while the daemon was down reports it in ``missed_runs`` of its next
``running`` message. A one-off whose only occurrence fell into the downtime
has no next running message; for it the test checks that nothing but its
``created`` is ever published.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.recurrence import Frequency, RecurrenceRule
from frequenz.client.dispatch.types import TargetIds

from tests.shell.daemon_harness import until

MICROGRID = 7
START_TIMEOUT = 60.0
"""Generous: importing grpc and friends takes seconds on a loaded 2-core machine."""


# ------------------------------------------------------------------ the daemon


class DaemonProcess:
    """One ``python -m dispatchd run`` subprocess; its JSON log lines are parsed."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self.synced = asyncio.Event()
        self.local_api_port: int | None = None
        self.synced_at: datetime | None = None
        """The daemon's own timestamp of ``first sync done``."""
        self.log: list[dict[str, Any]] = []

    async def start(self) -> None:
        """Spawn and wait until the first sync with the API is done."""
        process = await self.spawn()
        exited = asyncio.create_task(process.wait())
        synced = asyncio.create_task(self.synced.wait())
        done, _ = await asyncio.wait(
            {exited, synced}, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        exited.cancel()
        synced.cancel()
        if synced not in done:
            tail = "\n".join(json.dumps(line) for line in self.log[-20:])
            raise AssertionError(f"daemon did not finish its first sync; last log lines:\n{tail}")

    async def spawn(self) -> asyncio.subprocess.Process:
        """Start the subprocess without waiting for anything."""
        self.synced = asyncio.Event()
        self.local_api_port = None
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dispatchd",
            "run",
            env=self._env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read(self._process))
        return self._process

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(line, dict):
                continue
            self.log.append(line)
            event = line.get("event")
            if event == "local dispatch API listening":
                self.local_api_port = int(line["port"])
            elif event == "first sync done":
                self.synced_at = datetime.fromisoformat(line["timestamp"])
                self.synced.set()

    def kill(self) -> float:
        """SIGKILL now (no graceful anything); returns the wall-clock instant."""
        process = self._process
        assert process is not None
        assert process.returncode is None, "the daemon is not running"
        os.kill(process.pid, signal.SIGKILL)
        return time.time()

    async def wait_dead(self) -> None:
        assert self._process is not None
        returncode = await asyncio.wait_for(self._process.wait(), 30)
        assert returncode == -signal.SIGKILL
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 10)

    async def restart_after_kill(self) -> None:
        await self.wait_dead()
        await self.start()

    async def close(self) -> None:
        """Terminate gracefully if still alive (test teardown); show the log's tail."""
        for line in self.log[:12] + self.log[-10:]:
            print(json.dumps(line))
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 20)
        except TimeoutError:
            process.kill()
            await process.wait()
        if self._reader is not None:
            self._reader.cancel()

    def client(self) -> DispatchApiClient:
        assert self.local_api_port is not None
        return DispatchApiClient(
            server_url=f"grpc://127.0.0.1:{self.local_api_port}?ssl=false", auth_key="crash"
        )


# ------------------------------------------------------------- the observer


@dataclass(frozen=True)
class Delivery:
    message_id: str
    routing_key: str
    raw: bytes
    body: dict[str, Any]

    @property
    def dispatch_id(self) -> int:
        return int(self.body["dispatch"]["id"])

    @property
    def label(self) -> str:
        return f"{self.body['kind']}.{self.body['event']}"


@dataclass
class Observer:
    """Every delivery on the test's queue, in arrival order (duplicates kept)."""

    deliveries: list[Delivery] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    on_delivery: Callable[[Delivery], None] | None = None

    async def receive(self, message: AbstractIncomingMessage) -> None:
        assert message.message_id is not None
        delivery = Delivery(
            message.message_id, message.routing_key or "", message.body, json.loads(message.body)
        )
        self.deliveries.append(delivery)
        if self.on_delivery is not None:
            self.on_delivery(delivery)
        async with self.changed:
            self.changed.notify_all()

    def distinct(self) -> list[Delivery]:
        """First delivery of each message id, in arrival order."""
        seen: set[str] = set()
        out = []
        for delivery in self.deliveries:
            if delivery.message_id not in seen:
                seen.add(delivery.message_id)
                out.append(delivery)
        return out

    def of(self, dispatch_id: int) -> list[Delivery]:
        return [d for d in self.distinct() if d.dispatch_id == dispatch_id]

    def running(self, dispatch_id: int) -> list[tuple[str, str, datetime]]:
        """(event, reason, scheduled_for) of each distinct running message."""
        return [
            (d.body["event"], d.body["reason"], _time(d.body["scheduled_for"]))
            for d in self.of(dispatch_id)
            if d.body["kind"] == "running"
        ]

    async def wait_until(self, what: str, condition: Callable[[], bool], within: float) -> None:
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(condition), within)
            except TimeoutError:
                summary = [(d.dispatch_id, d.label, d.body.get("reason")) for d in self.distinct()]
                raise AssertionError(f"timed out waiting for {what}; got {summary}") from None


@contextlib.asynccontextmanager
async def observed(amqp_url: str, exchange_name: str) -> AsyncIterator[Observer]:
    """An exclusive queue bound to ``microgrid.#`` before the daemon ever starts."""
    observer = Observer()
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, "microgrid.#")
        await queue.consume(observer.receive, no_ack=True)
        yield observer
        await queue.delete(if_unused=False, if_empty=False)
        await channel.queue_delete(f"{exchange_name}.rpc")
        await channel.exchange_delete(exchange_name)
    finally:
        await connection.close()


# ---------------------------------------------------------------- fixtures


@pytest.fixture
async def harness(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path, clean_env: dict[str, str]
) -> AsyncIterator[tuple[DaemonProcess, Observer]]:
    exchange_name = unique_name("crash").translate(str.maketrans("[]", "__"))
    env = {
        **clean_env,
        "DISPATCHD_AMQP__URL": amqp_url,
        "DISPATCHD_AMQP__EXCHANGE": exchange_name,
        "DISPATCHD_STATE__DIR": str(tmp_path / "state"),
        "DISPATCHD_HTTP__LISTEN": "127.0.0.1:0",
        "DISPATCHD_API__LOCAL__LISTEN": "127.0.0.1:0",
        "DISPATCHD_MICROGRID_IDS": f"[{MICROGRID}]",
        "DISPATCHD_LOG__FORMAT": "json",
        "DISPATCHD_LOG__LEVEL": "INFO",
    }
    async with observed(amqp_url, exchange_name) as observer:
        daemon = DaemonProcess(env)
        try:
            yield daemon, observer
        finally:
            await daemon.close()


# ------------------------------------------------------------------ helpers


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _at(seconds: float, *, whole: bool = False) -> datetime:
    """A whole-millisecond (or whole-second) instant at least ``seconds`` from now."""
    moment = datetime.now(UTC) + timedelta(seconds=seconds)
    if whole:
        return moment.replace(microsecond=0) + timedelta(seconds=1)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


async def _create(
    client: DispatchApiClient,
    start: datetime,
    duration: int,
    *,
    recurrence: RecurrenceRule | None = None,
    type: str = "CRASH",
) -> int:
    created = await client.create(
        MicrogridId(MICROGRID),
        type,
        start,
        timedelta(seconds=duration),
        TargetIds(1),
        payload={"p": 1},
        recurrence=recurrence,
    )
    return int(created.id)


def assert_consistent(observer: Observer, dispatch_ids: Iterable[int]) -> None:
    """The invariants every crash must keep, over the whole history."""
    by_id: dict[str, Delivery] = {}
    for delivery in observer.deliveries:
        first = by_id.setdefault(delivery.message_id, delivery)
        assert first.raw == delivery.raw, f"message id {delivery.message_id} reused"
        assert first.routing_key == delivery.routing_key
    ids = set(dispatch_ids)
    seen = {d.dispatch_id for d in observer.distinct()}
    assert seen <= ids, f"messages for unknown dispatches {seen - ids}"
    for dispatch_id in ids:
        history = observer.of(dispatch_id)
        labels = [d.label for d in history]
        assert labels.count("lifecycle.created") == 1, (dispatch_id, labels)
        assert labels[0] == "lifecycle.created", (dispatch_id, labels)
        assert not {"lifecycle.updated", "lifecycle.deleted"} & set(labels), labels
        running = [d.body for d in history if d.body["kind"] == "running"]
        sequences = [body["sequence"] for body in running]
        assert sequences == list(range(1, len(running) + 1)), (dispatch_id, sequences)
        events = [body["event"] for body in running]
        for before, after in itertools.pairwise(events):
            assert not (before == after == "stopped"), (dispatch_id, events)
        if events:
            assert events[0] == "running", (dispatch_id, events)


def _kill_when(
    observer: Observer, daemon: DaemonProcess, condition: Callable[[], bool]
) -> asyncio.Future[float]:
    """Kill from inside the delivery callback the moment ``condition`` holds."""
    killed: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def check(_: Delivery) -> None:
        if not killed.done() and condition():
            killed.set_result(daemon.kill())

    observer.on_delivery = check
    return killed


# ------------------------------------------------------------------- tests


async def test_kill_right_after_create_before_start(
    harness: tuple[DaemonProcess, Observer],
) -> None:
    """Created (announced or not) before the kill: one ``created``, the run on time."""
    daemon, observer = harness
    await daemon.start()
    start = _at(10)
    client = daemon.client()
    announced = await _create(client, start, 1)
    await observer.wait_until(
        "created", lambda: [d.label for d in observer.of(announced)] == ["lifecycle.created"], 10
    )
    unannounced = await _create(client, start, 1)
    daemon.kill()
    await daemon.restart_after_kill()
    ids = (announced, unannounced)
    await observer.wait_until(
        "both stopped",
        lambda: all(len(observer.running(i)) == 2 for i in ids),
        20,
    )
    assert daemon.synced_at is not None
    # Back before the start: on time. Back later: learnt late (``resumed``).
    restarted_in_time = daemon.synced_at < start - timedelta(seconds=0.5)
    reasons = {"started"} if restarted_in_time else {"started", "resumed"}
    for dispatch_id in ids:
        [(running, reason, due), stopped] = observer.running(dispatch_id)
        assert (running, due) == ("running", start)
        assert reason in reasons
        assert stopped == ("stopped", "ended", start + timedelta(seconds=1))
    assert_consistent(observer, ids)


async def test_kill_while_running(harness: tuple[DaemonProcess, Observer]) -> None:
    """Running before the kill: not re-announced; learnt during the downtime: ``resumed``.

    ``long`` runs across the downtime: its ``running`` is not repeated after the
    restart, its ``stopped`` comes on time. ``short`` ends during the downtime:
    its ``stopped`` comes late, dated at its end. ``late`` starts during the
    downtime: ``running`` with reason ``resumed``, dated at its start. ``unseen``
    begins and ends during the downtime: nothing but ``created``.
    """
    daemon, observer = harness
    await daemon.start()
    client = daemon.client()
    base = _at(3)
    long = await _create(client, base, 14)
    short = await _create(client, base, 1)
    late = await _create(client, base + timedelta(seconds=2), 12)
    unseen = await _create(client, base + timedelta(seconds=1), 1)
    assert datetime.now(UTC) < base, "creating took too long for this scenario"
    ids = (long, short, late, unseen)
    await observer.wait_until("created", lambda: all(observer.of(i) for i in ids), 10)
    killed = _kill_when(observer, daemon, lambda: len(observer.running(long)) == 1)
    kill_time = await asyncio.wait_for(killed, 10)
    assert kill_time < (base + timedelta(seconds=1)).timestamp(), "too slow to kill in time"
    await daemon.wait_dead()
    await until(base + timedelta(seconds=2.5))
    await daemon.start()
    await observer.wait_until(
        "everything stopped",
        lambda: len(observer.running(long)) == 2 and len(observer.running(late)) == 2,
        25,
    )
    end = base + timedelta(seconds=14)
    assert observer.running(long) == [("running", "started", base), ("stopped", "ended", end)]
    assert observer.running(short) == [
        ("running", "started", base),
        ("stopped", "ended", base + timedelta(seconds=1)),
    ]
    late_start = base + timedelta(seconds=2)
    assert observer.running(late) == [
        ("running", "resumed", late_start),
        ("stopped", "ended", late_start + timedelta(seconds=12)),
    ]
    [late_running] = [d.body for d in observer.of(late) if d.body["event"] == "running"]
    assert late_running["missed_runs"] == []
    assert observer.running(unseen) == []
    assert_consistent(observer, ids)


@pytest.mark.parametrize("offset", [0.0, 0.004])
async def test_kill_at_a_boundary(harness: tuple[DaemonProcess, Observer], offset: float) -> None:
    """Killed at the instant several starts and stops are due: each is published once."""
    daemon, observer = harness
    await daemon.start()
    client = daemon.client()
    first = _at(3)
    boundary = first + timedelta(seconds=2)
    enders = [await _create(client, first, 2) for _ in range(3)]
    starters = [await _create(client, boundary, 10) for _ in range(3)]
    assert datetime.now(UTC) < first, "creating took too long for this scenario"
    ids = (*enders, *starters)
    await observer.wait_until(
        "enders running", lambda: all(len(observer.running(i)) == 1 for i in enders), 10
    )
    await until(boundary + timedelta(seconds=offset))
    daemon.kill()
    await daemon.restart_after_kill()
    await observer.wait_until(
        "all transitions",
        lambda: all(len(observer.running(i)) == 2 for i in ids),
        25,
    )
    for dispatch_id in enders:
        assert observer.running(dispatch_id) == [
            ("running", "started", first),
            ("stopped", "ended", boundary),
        ]
    for dispatch_id in starters:
        [(running, reason, due), stopped] = observer.running(dispatch_id)
        assert (running, due) == ("running", boundary)
        assert reason in {"started", "resumed"}
        assert stopped == ("stopped", "ended", boundary + timedelta(seconds=10))
    assert_consistent(observer, ids)


async def test_kill_during_a_burst_and_during_its_republish(
    harness: tuple[DaemonProcess, Observer],
) -> None:
    """Hundreds of simultaneous starts; killed mid-burst, then again mid-republish.

    The burst is committed in parts (docs/architecture.md): a dispatch whose
    part was committed before the kill keeps its ``started``; one whose part
    was not is converged by the restart (``resumed``, dated at the start it
    missed). Parts follow dispatch id, so the ``started`` ones come first.
    """
    daemon, observer = harness
    count = 300
    await daemon.start()
    client = daemon.client()
    start = _at(6)
    ids: list[int] = []
    for chunk in range(0, count, 50):
        ids.extend(
            await asyncio.gather(
                *(_create(client, start, 3) for _ in range(chunk, min(count, chunk + 50)))
            )
        )
    assert datetime.now(UTC) < start, "creating took too long for this scenario"
    await observer.wait_until(
        "created", lambda: len({d.dispatch_id for d in observer.distinct()}) == count, 20
    )

    def started() -> int:
        return sum(1 for d in observer.distinct() if d.body["kind"] == "running")

    killed = _kill_when(observer, daemon, lambda: started() >= count // 10)
    await asyncio.wait_for(killed, 20)
    await daemon.wait_dead()
    received_before = started()
    heard_before = {d.dispatch_id for d in observer.distinct() if d.body["kind"] == "running"}
    assert received_before < count, "the burst was over before the kill landed"
    halfway = received_before + (count - received_before) // 2
    killed_again = _kill_when(observer, daemon, lambda: started() >= halfway)
    await daemon.spawn()
    await asyncio.wait_for(killed_again, START_TIMEOUT)
    observer.on_delivery = None
    received_again = started()
    await daemon.restart_after_kill()
    await observer.wait_until(
        "every stop", lambda: all(len(observer.running(i)) == 2 for i in ids), 30
    )
    end = start + timedelta(seconds=3)
    reasons = []
    for dispatch_id in sorted(ids):
        [(running, reason, due), stopped] = observer.running(dispatch_id)
        assert (running, due) == ("running", start), dispatch_id
        assert stopped == ("stopped", "ended", end), dispatch_id
        reasons.append(reason)
        if dispatch_id in heard_before:
            assert reason == "started", dispatch_id
    committed = reasons.count("started")
    assert reasons == ["started"] * committed + ["resumed"] * (count - committed)
    assert_consistent(observer, ids)
    duplicates = len(observer.deliveries) - len(observer.distinct())
    print(
        f"distinct running messages seen at the kills: {received_before}, {received_again};"
        f" committed before the first kill: {committed};"
        f" duplicate deliveries: {duplicates}"
    )


@pytest.mark.timeout(240)
async def test_missed_run_of_a_recurring_dispatch(harness: tuple[DaemonProcess, Observer]) -> None:
    """An occurrence entirely inside the downtime is in the next running's ``missed_runs``.

    MINUTELY is the smallest period, so this test spans a minute.
    """
    daemon, observer = harness
    await daemon.start()
    client = daemon.client()
    # Whole seconds: rrule drops the microseconds of dtstart.
    first = _at(3, whole=True)
    rule = RecurrenceRule(frequency=Frequency.MINUTELY, interval=1)
    recurring = await _create(client, first, 20, recurrence=rule)
    await observer.wait_until("created", lambda: bool(observer.of(recurring)), 10)
    daemon.kill()
    await daemon.wait_dead()
    await until(first + timedelta(seconds=21))
    await daemon.start()
    second = first + timedelta(seconds=60)
    assert observer.running(recurring) == []
    await observer.wait_until("next run", lambda: bool(observer.running(recurring)), 70)
    [message] = [d.body for d in observer.of(recurring) if d.body["kind"] == "running"]
    assert (message["event"], message["reason"], message["sequence"]) == ("running", "started", 1)
    assert _time(message["scheduled_for"]) == second
    assert [_time(t) for t in message["missed_runs"]] == [first]
    assert_consistent(observer, [recurring])

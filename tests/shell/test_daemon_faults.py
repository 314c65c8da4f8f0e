"""``dispatchd run`` through faults: broker cut, API stream cut, broker down at start, stop.

The daemon's broker and API connections go through ``tests.tcpproxy.TcpProxy``
so a test can cut them while transitions are due; the observer and the test's
own API client talk to RabbitMQ and the API directly, so they see what really
reached the broker and what really is in the API.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from frequenz.client.dispatch.types import TargetIds

from dispatchd.localapi.server import LocalApiServer
from dispatchd.store import SqliteStore
from tests.shell.daemon_harness import (
    MG,
    QueueObserver,
    Received,
    api_client,
    broker_address,
    check_envelope,
    http_get,
    metric,
    mg,
    poll,
    proxied_amqp_url,
    running_daemon,
    soon,
    until,
)
from tests.tcpproxy import TcpProxy

WAIT = 15.0


async def readyz_until(port: int, status: int, within: float = WAIT) -> dict[str, object]:
    """GET /readyz until it answers ``status``; returns its JSON body."""
    async with asyncio.timeout(within):
        while True:
            got, body = await http_get(port, "/readyz")
            if got == status:
                parsed: dict[str, object] = json.loads(body)
                return parsed
            await asyncio.sleep(0.02)


def per_dispatch(received: list[Received], dispatch_id: int) -> list[str]:
    return [r.short() for r in received if r.dispatch_id == dispatch_id]


def is_running(dispatch_id: int) -> Callable[[Received], bool]:
    return lambda received: received.is_(dispatch_id, "running")


def assert_duplicates_identical(received: list[Received]) -> None:
    """At least once: a message seen twice is the same message (id, key and body)."""
    first: dict[str | None, Received] = {}
    for item in received:
        check_envelope(item)
        seen = first.setdefault(item.message_id, item)
        assert (seen.routing_key, seen.body) == (item.routing_key, item.body), item.message_id


async def test_broker_cut_while_transitions_are_due(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    """Transitions due while the broker is unreachable are computed on time, kept in
    the outbox and published after it is back, in order; the one whose confirm was
    lost is republished with the same message id; /readyz says 503 meanwhile."""
    exchange = unique_name("e2e")
    async with (
        TcpProxy(*broker_address(amqp_url)) as proxy,
        QueueObserver(amqp_url, exchange) as observer,
        running_daemon(tmp_path, proxied_amqp_url(amqp_url, proxy.port), exchange) as handle,
    ):
        a = await handle.client.create(mg(), "CUT", soon(1.5), timedelta(seconds=1), TargetIds(1))
        b = await handle.client.create(mg(), "CUT", soon(2), timedelta(seconds=1), TargetIds(2))
        a_id, b_id = int(a.id), int(b.id)
        await observer.take(2, WAIT)
        # The broker gets A's start but its confirm is held back, then the link dies.
        proxy.pause()
        in_doubt = await observer.wait_for(lambda r: r.is_(a_id, "running"), WAIT)
        await proxy.refuse()
        proxy.resume()
        ready = await readyz_until(handle.http_port, 503)
        assert ready["ready"] is False
        assert any("broker" in str(reason) for reason in ready["missing"]), ready  # type: ignore[attr-defined]
        assert metric("dispatchd_broker_up") == 0
        publisher = handle.daemon.publisher
        assert publisher is not None
        await until(b.start_time + timedelta(seconds=1))
        # A running (unconfirmed), A stopped, B running, B stopped wait in the outbox.
        await poll(lambda: publisher.unconfirmed >= 4)
        assert metric("dispatchd_outbox_messages") >= 4
        await proxy.accept()
        await observer.seen(lambda r: r.is_(b_id, "stopped"), WAIT)
        await observer.seen(lambda r: r.is_(a_id, "stopped"), WAIT)
        await readyz_until(handle.http_port, 200)
        await poll(lambda: publisher.unconfirmed == 0)
        # Set by the reconnect callback, which may run just after publishing resumed.
        await poll(lambda: metric("dispatchd_broker_up") == 1)

    received = observer.received
    assert_duplicates_identical(received)
    assert per_dispatch(received, a_id) == [
        f"{a_id}:lifecycle.created/None",
        f"{a_id}:running.running/started",
        f"{a_id}:running.running/started",  # republished: confirm lost in the cut
        f"{a_id}:running.stopped/ended",
    ]
    assert per_dispatch(received, b_id) == [
        f"{b_id}:lifecycle.created/None",
        f"{b_id}:running.running/started",
        f"{b_id}:running.stopped/ended",
    ]
    again = [r for r in received if r.message_id == in_doubt.message_id]
    assert len(again) == 2 and again[1].arrived > in_doubt.arrived
    for item in received:
        if item.kind == "running":
            # Computed on time during the cut: only the publishing was late.
            lateness = item.running.emitted_at - item.running.scheduled_for
            assert lateness < timedelta(seconds=1), item


async def test_api_stream_cut_is_reconciled_after_restore(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    """Changes made while the daemon cannot reach the API arrive after the reconnect,
    and nothing else: no second ``created``, no ``deleted`` for one that merely ended."""
    exchange = unique_name("e2e")
    server = LocalApiServer(listen="127.0.0.1:0", database=tmp_path / "api.sqlite3")
    port = await server.start()
    direct = api_client(f"grpc://127.0.0.1:{port}?ssl=false")
    try:
        async with (
            TcpProxy("127.0.0.1", port) as proxy,
            QueueObserver(amqp_url, exchange) as observer,
            running_daemon(
                tmp_path / "daemon",
                amqp_url,
                exchange,
                api_url=f"grpc://127.0.0.1:{proxy.port}?ssl=false",
            ) as handle,
        ):
            assert handle.daemon.local_api_port is None  # synced from the proxied server
            reconnects = metric("dispatchd_api_reconnects_total", microgrid_id=str(MG))
            kept = await direct.create(mg(), "KEEP", soon(60), timedelta(seconds=5), TargetIds(1))
            changed = await direct.create(mg(), "CHG", soon(60), timedelta(seconds=5), TargetIds(1))
            gone = await direct.create(mg(), "GONE", soon(60), timedelta(seconds=5), TargetIds(1))
            ends = await direct.create(mg(), "ENDS", "NOW", timedelta(seconds=1), TargetIds(1))
            ids = [int(d.id) for d in (kept, changed, gone, ends)]
            await observer.wait_for(lambda r: r.is_(ids[3], "running"), WAIT)
            await proxy.refuse()
            await poll(lambda: metric("dispatchd_api_stream_up", microgrid_id=str(MG)) == 0)
            new = await direct.create(mg(), "NEW", soon(60), timedelta(seconds=5), TargetIds(1))
            await direct.update(
                microgrid_id=mg(), dispatch_id=changed.id, new_fields={"payload": {"x": 1}}
            )
            await direct.delete(microgrid_id=mg(), dispatch_id=gone.id)
            # The engine's own timer still ends the running one while the API is away.
            await observer.wait_for(lambda r: r.is_(ids[3], "stopped", "ended"), WAIT)
            await proxy.accept()
            await poll(lambda: metric("dispatchd_api_stream_up", microgrid_id=str(MG)) == 1)
            await observer.seen(lambda r: r.is_(int(new.id), "created"), WAIT)
            await observer.seen(lambda r: r.is_(ids[1], "updated"), WAIT)
            await observer.seen(lambda r: r.is_(ids[2], "deleted"), WAIT)
            assert metric("dispatchd_api_reconnects_total", microgrid_id=str(MG)) > reconnects
            # A change after the reconnect as a marker: nothing else was pending before it.
            await direct.update(
                microgrid_id=mg(), dispatch_id=kept.id, new_fields={"payload": {"m": 1}}
            )
            await observer.wait_for(lambda r: r.is_(ids[0], "updated"), WAIT)
            assert handle.daemon.ready.is_set()
    finally:
        await direct.disconnect()
        await server.stop(0)

    received = observer.received
    assert_duplicates_identical(received)
    assert len({r.message_id for r in received}) == len(received)
    kept_id, changed_id, gone_id, ends_id = ids
    assert per_dispatch(received, kept_id) == [
        f"{kept_id}:lifecycle.created/None",
        f"{kept_id}:lifecycle.updated/None",
    ]
    assert per_dispatch(received, changed_id) == [
        f"{changed_id}:lifecycle.created/None",
        f"{changed_id}:lifecycle.updated/None",
    ]
    assert per_dispatch(received, gone_id) == [
        f"{gone_id}:lifecycle.created/None",
        f"{gone_id}:lifecycle.deleted/None",
    ]
    assert per_dispatch(received, ends_id) == [
        f"{ends_id}:lifecycle.created/None",
        f"{ends_id}:running.running/created",
        f"{ends_id}:running.stopped/ended",
    ]
    assert per_dispatch(received, int(new.id)) == [f"{int(new.id)}:lifecycle.created/None"]
    updated = next(r for r in received if r.is_(changed_id, "updated"))
    assert updated.message.dispatch.payload == {"x": 1}


async def test_broker_unreachable_at_start_then_ready_when_it_opens(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    exchange = unique_name("e2e")
    async with TcpProxy(*broker_address(amqp_url)) as proxy:
        await proxy.refuse()
        async with running_daemon(
            tmp_path, proxied_amqp_url(amqp_url, proxy.port), exchange, wait_ready=False
        ) as handle:
            ready = await readyz_until(handle.http_port, 503)
            missing = [str(reason) for reason in ready["missing"]]  # type: ignore[attr-defined]
            assert any(reason.startswith("broker: not connected") for reason in missing), ready
            assert any("unreachable" in reason or "connecting" in reason for reason in missing)
            status, _ = await http_get(handle.http_port, "/livez")
            assert status == 200
            assert not handle.task.done()
            async with QueueObserver(amqp_url, exchange) as observer:
                await proxy.accept()
                await asyncio.wait_for(handle.daemon.ready.wait(), WAIT)
                body = await readyz_until(handle.http_port, 200)
                assert body == {"ready": True, "missing": [], "unpublished": 0}
                created = await handle.client.create(
                    mg(), "LATE", "NOW", timedelta(seconds=30), TargetIds(1)
                )
                first = await observer.next(WAIT)
                assert first.is_(int(created.id), "created")


async def test_graceful_stop_with_messages_in_flight_keeps_them_for_the_next_start(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    """Unconfirmed messages at stop stay in the outbox; the stop keeps its time budget;
    the next start republishes them with their original message ids."""
    exchange = unique_name("e2e")
    outbox_gauge = metric("dispatchd_outbox_messages")
    async with (
        TcpProxy(*broker_address(amqp_url)) as proxy,
        QueueObserver(amqp_url, exchange) as observer,
    ):
        async with running_daemon(
            tmp_path,
            proxied_amqp_url(amqp_url, proxy.port),
            exchange,
            extra={"DISPATCHD_SHUTDOWN_TIMEOUT": "2"},
        ) as handle:
            created = [
                await handle.client.create(mg(), "STOP", "NOW", timedelta(seconds=60), TargetIds(n))
                for n in (1, 2)
            ]
            await observer.take(4, WAIT)  # created + running of both
            publisher = handle.daemon.publisher
            assert publisher is not None
            await poll(lambda: publisher.unconfirmed == 0)
            proxy.pause()  # confirms of what follows never come back
            for dispatch in created:
                await handle.client.update(
                    microgrid_id=mg(), dispatch_id=dispatch.id, new_fields={"payload": {"v": 1}}
                )
            # Each ``updated`` reached the broker; each ``reconfigured`` waits behind it
            # (at most one unconfirmed message per dispatch).
            in_flight = await observer.take(2, WAIT)
            assert sorted(r.short() for r in in_flight) == sorted(
                f"{int(d.id)}:lifecycle.updated/None" for d in created
            )
            await poll(lambda: publisher.unconfirmed == 4)
            await poll(lambda: metric("dispatchd_outbox_messages") == outbox_gauge + 4)
            stopped_in = await handle.stop()
        assert stopped_in < 2 + 1.0, stopped_in
        store = SqliteStore(tmp_path / "dispatchd.sqlite3")
        try:
            left = [item.envelope.message_id for item in await store.outbox()]
        finally:
            await store.close()
        assert len(left) == 4
        assert {r.message_id for r in in_flight} <= set(left)
        proxy.resume()
        async with running_daemon(tmp_path, amqp_url, exchange) as restarted:
            again = await observer.take(4, WAIT)
            republisher = restarted.daemon.publisher
            assert republisher is not None
            await poll(lambda: republisher.unconfirmed == 0)
            await poll(lambda: metric("dispatchd_outbox_messages") == outbox_gauge)
        # Republished with their original ids and bodies, then nothing else new.
        assert sorted(r.message_id for r in again) == sorted(left)  # type: ignore[type-var]
        for item in in_flight:
            assert item.body == next(r.body for r in again if r.message_id == item.message_id)
        for dispatch in created:
            mine = [r.short() for r in again if r.dispatch_id == int(dispatch.id)]
            assert mine == [
                f"{int(dispatch.id)}:lifecycle.updated/None",
                f"{int(dispatch.id)}:running.running/reconfigured",
            ]


async def test_api_unreachable_at_start_is_not_ready_until_the_first_sync(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    """/readyz names the microgrid whose first sync is missing; a dispatch created
    meanwhile is announced once the API is reachable."""
    exchange = unique_name("e2e")
    server = LocalApiServer(listen="127.0.0.1:0", database=tmp_path / "api.sqlite3")
    port = await server.start()
    direct = api_client(f"grpc://127.0.0.1:{port}?ssl=false")
    try:
        async with TcpProxy("127.0.0.1", port) as proxy:
            await proxy.refuse()
            async with (
                QueueObserver(amqp_url, exchange) as observer,
                running_daemon(
                    tmp_path / "daemon",
                    amqp_url,
                    exchange,
                    api_url=f"grpc://127.0.0.1:{proxy.port}?ssl=false",
                    wait_ready=False,
                ) as handle,
            ):
                body = await readyz_until(handle.http_port, 503)
                assert body["missing"] == [
                    f"microgrid {MG}: first sync with the dispatch API not finished"
                ], body
                waiting = await direct.create(mg(), "WAIT", soon(60), None, TargetIds(1))
                await proxy.accept()
                await asyncio.wait_for(handle.daemon.ready.wait(), WAIT)
                assert (await readyz_until(handle.http_port, 200))["ready"] is True
                first = await observer.next(WAIT)
                assert first.is_(int(waiting.id), "created")
    finally:
        await direct.disconnect()
        await server.stop(0)


async def test_graceful_restart_publishes_only_what_changed_while_down(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    """The API keeps running while the daemon is down; on restart the daemon diffs
    the fresh list against its persisted view: no second ``created``, no repeated
    ``running`` for an occurrence already announced, and every real change."""
    exchange = unique_name("e2e")
    server = LocalApiServer(listen="127.0.0.1:0", database=tmp_path / "api.sqlite3")
    port = await server.start()
    url = f"grpc://127.0.0.1:{port}?ssl=false"
    direct = api_client(url)
    state = tmp_path / "daemon"
    try:
        async with QueueObserver(amqp_url, exchange) as observer:
            async with running_daemon(state, amqp_url, exchange, api_url=url):
                idle = await direct.create(
                    mg(), "IDLE", soon(60), timedelta(seconds=5), TargetIds(1)
                )
                steady = await direct.create(
                    mg(), "STEADY", "NOW", timedelta(seconds=60), TargetIds(1)
                )
                changed = await direct.create(
                    mg(), "CHG", "NOW", timedelta(seconds=60), TargetIds(1)
                )
                gone = await direct.create(
                    mg(), "GONE", soon(60), timedelta(seconds=5), TargetIds(1)
                )
                ends = await direct.create(mg(), "ENDS", "NOW", timedelta(seconds=1), TargetIds(1))
                for running_id in (int(steady.id), int(changed.id), int(ends.id)):
                    await observer.seen(is_running(running_id), WAIT)
                await observer.seen(lambda r: r.is_(int(gone.id), "created"), WAIT)
            before = len(observer.received)
            await direct.update(
                microgrid_id=mg(), dispatch_id=changed.id, new_fields={"payload": {"x": 1}}
            )
            await direct.delete(microgrid_id=mg(), dispatch_id=gone.id)
            new = await direct.create(mg(), "NEW", "NOW", timedelta(seconds=60), TargetIds(1))
            await until(ends.start_time + timedelta(seconds=1))
            async with running_daemon(state, amqp_url, exchange, api_url=url):
                await observer.seen(lambda r: r.is_(int(ends.id), "stopped"), WAIT)
                await observer.seen(lambda r: r.is_(int(new.id), "running"), WAIT)
                await observer.seen(
                    lambda r: r.is_(int(changed.id), "running", "reconfigured"), WAIT
                )
                await observer.seen(lambda r: r.is_(int(gone.id), "deleted"), WAIT)
                marker = await direct.create(mg(), "MARKER", soon(60), None, TargetIds(1))
                await observer.seen(lambda r: r.is_(int(marker.id), "created"), WAIT)
    finally:
        await direct.disconnect()
        await server.stop(0)

    after = observer.received[before:]
    assert_duplicates_identical(observer.received)
    assert len({r.message_id for r in observer.received}) == len(observer.received)
    assert per_dispatch(after, int(idle.id)) == []
    assert per_dispatch(after, int(steady.id)) == []
    c, g, e, n = int(changed.id), int(gone.id), int(ends.id), int(new.id)
    assert per_dispatch(after, c) == [
        f"{c}:lifecycle.updated/None",
        f"{c}:running.running/reconfigured",
    ]
    assert per_dispatch(after, g) == [f"{g}:lifecycle.deleted/None"]
    assert per_dispatch(after, e) == [f"{e}:running.stopped/ended"]
    stopped = next(r for r in after if r.dispatch_id == e)
    assert stopped.running.scheduled_for == ends.start_time + timedelta(seconds=1)
    assert stopped.running.sequence == 2
    created, running = per_dispatch(after, n)
    assert created == f"{n}:lifecycle.created/None"
    # Learnt at the restart, already inside its occurrence (docs/scheduling.md allows either).
    assert running in (f"{n}:running.running/created", f"{n}:running.running/resumed")
    assert [r.short() for r in after][-1] == f"{int(marker.id)}:lifecycle.created/None"

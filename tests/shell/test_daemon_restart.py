"""``dispatchd run`` restarted: re-list first, then converge (``api.first_sync_timeout``).

The stored view may be stale: a dispatch may have been moved, deactivated or
deleted while the daemon was down. Nothing that fell due in the downtime is
announced before the microgrid's first list, or before the timeout when the
API cannot be reached; boundaries after the restart are still on time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from frequenz.client.dispatch.types import TargetIds

from dispatchd.localapi.server import LocalApiServer
from tests.shell.daemon_harness import (
    MG,
    QueueObserver,
    Received,
    api_client,
    http_get,
    mg,
    running_daemon,
    soon,
    until,
)
from tests.tcpproxy import TcpProxy

WAIT = 15.0


def per_dispatch(received: list[Received], dispatch_id: int) -> list[str]:
    return [r.short() for r in received if r.dispatch_id == dispatch_id]


async def test_changes_made_while_down_get_no_running_for_the_old_occurrence(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    """Moved, deleted and deactivated while down, after their old start: on restart
    only the lifecycle messages, no ``running(resumed)`` and ``stopped`` flap."""
    exchange = unique_name("e2e")
    server = LocalApiServer(listen="127.0.0.1:0", database=tmp_path / "api.sqlite3")
    port = await server.start()
    url = f"grpc://127.0.0.1:{port}?ssl=false"
    direct = api_client(url)
    state = tmp_path / "daemon"
    try:
        async with QueueObserver(amqp_url, exchange) as observer:
            async with running_daemon(state, amqp_url, exchange, api_url=url):
                start = soon(5)
                hour = timedelta(hours=1)
                moved = await direct.create(mg(), "MOVED", start, hour, TargetIds(1))
                gone = await direct.create(mg(), "GONE", start, hour, TargetIds(1))
                off = await direct.create(mg(), "OFF", start, hour, TargetIds(1))
                for dispatch in (moved, gone, off):
                    await observer.seen(lambda r, d=int(dispatch.id): r.is_(d, "created"), WAIT)
            assert datetime.now(UTC) < start, "the daemon must be down before the start"
            await direct.update(
                microgrid_id=mg(), dispatch_id=moved.id, new_fields={"start_time": soon(600)}
            )
            await direct.delete(microgrid_id=mg(), dispatch_id=gone.id)
            await direct.update(microgrid_id=mg(), dispatch_id=off.id, new_fields={"active": False})
            await until(start + timedelta(seconds=0.5))
            before = len(observer.received)
            async with running_daemon(state, amqp_url, exchange, api_url=url):
                marker = await direct.create(mg(), "MARKER", soon(600), None, TargetIds(1))
                await observer.seen(lambda r: r.is_(int(marker.id), "created"), WAIT)
    finally:
        await direct.disconnect()
        await server.stop(0)

    after = observer.received[before:]
    m, g, o = int(moved.id), int(gone.id), int(off.id)
    assert per_dispatch(after, m) == [f"{m}:lifecycle.updated/None"]
    assert per_dispatch(after, g) == [f"{g}:lifecycle.deleted/None"]
    assert per_dispatch(after, o) == [f"{o}:lifecycle.updated/None"]


async def test_unreachable_api_at_restart_converges_after_the_timeout_and_says_so(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    """A start due while the first list is awaited goes out on time; what fell due in
    the downtime waits for ``api.first_sync_timeout``, then converges from the stored
    state, and /readyz says so until the API answers."""
    exchange = unique_name("e2e")
    server = LocalApiServer(listen="127.0.0.1:0", database=tmp_path / "api.sqlite3")
    port = await server.start()
    direct = api_client(f"grpc://127.0.0.1:{port}?ssl=false")
    state = tmp_path / "daemon"
    timeout = 8.0
    try:
        async with (
            QueueObserver(amqp_url, exchange) as observer,
            TcpProxy("127.0.0.1", port) as proxy,
        ):
            api_url = f"grpc://127.0.0.1:{proxy.port}?ssl=false"
            extra = {"DISPATCHD_API__FIRST_SYNC_TIMEOUT": str(timeout)}
            async with running_daemon(state, amqp_url, exchange, api_url=api_url, extra=extra):
                steady = await direct.create(
                    mg(), "STEADY", soon(3), timedelta(hours=1), TargetIds(1)
                )
                later = await direct.create(
                    mg(), "LATER", soon(9), timedelta(hours=1), TargetIds(1)
                )
                for dispatch in (steady, later):
                    await observer.seen(lambda r, d=int(dispatch.id): r.is_(d, "created"), WAIT)
            await until(steady.start_time + timedelta(seconds=0.5))
            await proxy.refuse()
            before = len(observer.received)
            async with running_daemon(
                state, amqp_url, exchange, api_url=api_url, extra=extra, wait_ready=False
            ) as handle:
                restarted = datetime.now(UTC)
                on_time = await observer.seen(
                    lambda r: r.is_(int(later.id), "running", "started"), WAIT
                )
                status, body = await http_get(handle.http_port, "/readyz")
                assert status == 503
                assert json.loads(body)["missing"] == [
                    f"microgrid {MG}: first sync with the dispatch API not finished"
                ]
                resumed = await observer.seen(
                    lambda r: r.is_(int(steady.id), "running", "resumed"), WAIT + timeout
                )
                status, body = await http_get(handle.http_port, "/readyz")
                assert status == 503
                assert json.loads(body)["missing"] == [
                    f"microgrid {MG}: first sync with the dispatch API not finished "
                    f"after {timeout:g} s; converged from the stored state"
                ]
                await proxy.accept()
                await asyncio.wait_for(handle.daemon.ready.wait(), WAIT)
                marker = await direct.create(mg(), "MARKER", soon(600), None, TargetIds(1))
                await observer.seen(lambda r: r.is_(int(marker.id), "created"), WAIT)
    finally:
        await direct.disconnect()
        await server.stop(0)

    assert on_time.running.emitted_at - later.start_time < timedelta(seconds=2)
    assert resumed.running.emitted_at - restarted >= timedelta(seconds=timeout - 0.5)
    assert resumed.running.scheduled_for == steady.start_time
    after = observer.received[before:]
    s = int(steady.id)
    assert per_dispatch(after, s) == [f"{s}:running.running/resumed"]

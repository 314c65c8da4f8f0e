"""Oversized or unconvertible dispatches from an API never block a microgrid's sync.

The daemon syncs from a :class:`~tests.shell.scripted_api.ScriptedApi`, which
(unlike the local API) enforces no size caps: its List pages may exceed
gRPC's default 4 MiB receive limit, and it may send a dispatch the daemon
cannot convert.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from frequenz.api.common.v1alpha8.streaming.event_pb2 import Event

from dispatchd.core.model import Dispatch
from tests.shell.daemon_harness import MG, QueueObserver, metric, running_daemon, soon
from tests.shell.scripted_api import ScriptedApi, dispatch_pb

WAIT = 30.0
"""Bound for the first sync and its messages (megabytes of targets on a loaded machine)."""


async def test_list_pages_over_4_mib_still_sync(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    exchange = unique_name("big")
    huge = [
        dispatch_pb(
            n, f"HUGE{n}", soon(3600), timedelta(minutes=5), target=range(10**12, 10**12 + 250_000)
        )
        for n in (1, 2, 3)
    ]
    small = dispatch_pb(4, "SMALL", soon(3600), timedelta(minutes=5))
    assert sum(d.ByteSize() for d in huge) > 4 * 1024 * 1024
    async with ScriptedApi() as api, QueueObserver(amqp_url, exchange) as observer:
        for dispatch in (*huge, small):
            api.put(dispatch)
        async with running_daemon(tmp_path, amqp_url, exchange, api_url=api.url):
            for dispatch_id in (1, 2, 3, 4):
                await observer.seen(lambda r, i=dispatch_id: r.is_(i, "created"), WAIT)


async def test_one_unconvertible_dispatch_is_skipped_and_counted(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    exchange = unique_name("bad")
    broken = dispatch_pb(1, "BROKEN", soon(3600), timedelta(minutes=5))
    broken.data.ClearField("target")
    good = dispatch_pb(2, "GOOD", soon(3600), timedelta(minutes=5))
    try:
        Dispatch.from_protobuf(broken, MG)
    except ValueError:
        pass
    else:
        raise AssertionError("the broken dispatch must be unconvertible for this test")
    skipped = metric("dispatchd_api_skipped_dispatches_total", microgrid_id=str(MG))
    async with ScriptedApi() as api, QueueObserver(amqp_url, exchange) as observer:
        api.put(broken)
        api.put(good)
        async with running_daemon(tmp_path, amqp_url, exchange, api_url=api.url) as daemon:
            await observer.seen(lambda r: r.is_(2, "created"), WAIT)
            assert not observer.of(1)
            assert (
                metric("dispatchd_api_skipped_dispatches_total", microgrid_id=str(MG))
                == skipped + 1
            )
            # It never runs: counted as invalid, beside the engine's own invalid ones.
            status, _ = await daemon.http_get("/metrics")
            assert status == 200
            assert metric("dispatchd_dispatches", microgrid_id=str(MG), state="invalid") == 1
            # Deleted in the API: no longer counted. The stream keeps its order, so once
            # a later event's message is out, the deletion was handled.
            api.remove(1)
            await api.push(Event.EVENT_DELETED, broken)
            later = dispatch_pb(3, "GOOD", soon(3600), timedelta(minutes=5))
            api.put(later)
            await api.push(Event.EVENT_CREATED, later)
            await observer.seen(lambda r: r.is_(3, "created"), WAIT)
            await daemon.http_get("/metrics")
            assert not metric("dispatchd_dispatches", microgrid_id=str(MG), state="invalid")

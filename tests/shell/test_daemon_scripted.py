"""docs/scheduling.md cases only a scripted dispatch API can produce, observed end to end.

The daemon syncs from a :class:`~tests.shell.scripted_api.ScriptedApi` (a real
gRPC server) whose listing and stream events each test writes: a type change
(consequence 15), stale, duplicate and out-of-order events, a dispatch that
vanishes from a re-list without a DELETED event, and changes made while the
stream is cut. As in test_daemon_semantics.py every test checks the exact
messages (in order per dispatch: the publisher may interleave different
dispatches, docs/messages.md § 5), proves silence with a quiet period followed by a
marker event that must be the next thing published, and the fixture checks
every envelope, message id and sequence afterwards (``check_stream``). The
scripted API pages by 2 so every listing here takes several pages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dispatchd import apisync
from tests.shell.daemon_harness import (
    MG,
    DaemonHandle,
    QueueObserver,
    Received,
    check_stream,
    metric,
    running_daemon,
    soon,
)
from tests.shell.scripted_api import (
    CREATED,
    DELETED,
    UPDATED,
    ScriptedApi,
    dispatch_pb,
    revised,
)

WAIT = 15.0
"""Upper bound for a batch of messages or a reconnect (all are due within seconds)."""
QUIET = 1.0
"""How long nothing may arrive before the marker event."""
SECONDS = timedelta(seconds=1)
RECONNECT = 2.5
"""Bound for one reconnect after a working stream was lost: the first backoff step
(at most 0.5 s) plus a re-list, with room for a loaded machine."""

Site = tuple[QueueObserver, ScriptedApi, DaemonHandle]


@pytest.fixture
async def site(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> AsyncIterator[Site]:
    exchange = unique_name("e2e")
    async with (
        ScriptedApi(max_page_size=2) as api,
        QueueObserver(amqp_url, exchange) as observer,
        running_daemon(tmp_path, amqp_url, exchange, api_url=api.url) as handle,
    ):
        assert handle.daemon.local_api_port is None  # synced from the scripted API
        yield observer, api, handle
        check_stream(observer.received)


async def expect(observer: QueueObserver, *expected: str) -> list[Received]:
    """The next messages are exactly these (``"<id>:<kind>.<event>/<reason>"``).

    In this order per dispatch; different dispatches may interleave, as the
    publisher pipelines them (docs/messages.md § 5 orders per dispatch only). Returned
    in the order of ``expected``.
    """
    got = await observer.take(len(expected), WAIT)
    assert by_dispatch(shorts(got)) == by_dispatch(expected), shorts(got)
    unused = list(got)
    ordered = []
    for short in expected:
        match = next(r for r in unused if r.short() == short)
        unused.remove(match)
        ordered.append(match)
    return ordered


def shorts(received: Iterable[Received]) -> list[str]:
    return [r.short() for r in received]


def by_dispatch(items: Iterable[str]) -> dict[str, list[str]]:
    """Short forms grouped by dispatch id, each group in the given order."""
    groups: dict[str, list[str]] = {}
    for short in items:
        groups.setdefault(short.partition(":")[0], []).append(short)
    return groups


def base_time() -> datetime:
    """A reference ``create_time``; versions are ``base + n seconds`` (whole ms, as the API)."""
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


async def test_15_type_change_while_running_stops_the_old_type_and_runs_the_new(
    site: Site, amqp_url: str
) -> None:
    """Consequence 15, with the lifecycle rules: ``updated`` goes out under both types
    (the old first) before the running messages the change causes."""
    observer, api, handle = site
    async with QueueObserver(
        amqp_url,
        handle.settings.amqp.exchange,
        bindings=(f"microgrid.{MG}.running.*.A",),
        delete_exchange=False,
    ) as old_actor:
        t0 = base_time()
        start = soon(1)
        end = start + 2 * SECONDS
        a = dispatch_pb(1, "A", start, 2 * SECONDS, payload={"p": 1}, create_time=t0)
        api.put(a)
        await api.push(CREATED, a)
        created, started = await expect(
            observer, "1:lifecycle.created/None", "1:running.running/started"
        )
        b = revised(a, t0 + SECONDS, type="B", payload={"p": 2})
        api.put(b)
        await api.push(UPDATED, b)
        updated_a, updated_b, stopped, running = await expect(
            observer,
            "1:lifecycle.updated/None",
            "1:lifecycle.updated/None",
            "1:running.stopped/type_changed",
            "1:running.running/reconfigured",
        )
        (ended,) = await expect(observer, "1:running.stopped/ended")
        # The old type's actors heard the start and the stop, nothing else.
        heard = await old_actor.take(2, WAIT)
        await old_actor.expect_quiet(0.3)

    lifecycle = f"microgrid.{MG}.lifecycle"
    assert [r.routing_key for r in (created, updated_a, updated_b)] == [
        f"{lifecycle}.created.A",
        f"{lifecycle}.updated.A",
        f"{lifecycle}.updated.B",
    ]
    assert [r.routing_key for r in (started, stopped, running, ended)] == [
        f"microgrid.{MG}.running.running.A",
        f"microgrid.{MG}.running.stopped.A",
        f"microgrid.{MG}.running.running.B",
        f"microgrid.{MG}.running.stopped.B",
    ]
    assert [r.headers["dispatch_type"] for r in (updated_a, updated_b, stopped, running)] == [
        "A",
        "B",
        "A",
        "B",
    ]
    assert shorts(heard) == ["1:running.running/started", "1:running.stopped/type_changed"]
    # Both lifecycle messages carry the new version; the stop carries what A's actors ran.
    old, new = created.message.dispatch, updated_b.message.dispatch
    assert (old.type, dict(old.payload)) == ("A", {"p": 1})
    assert (new.type, dict(new.payload), new.update_time) == ("B", {"p": 2}, t0 + SECONDS)
    assert updated_a.message.dispatch == new
    assert stopped.message.dispatch == started.message.dispatch == old
    assert running.message.dispatch == ended.message.dispatch == new
    occurrence = started.running.occurrence
    assert (occurrence.start, occurrence.end) == (start, end)
    assert stopped.running.occurrence == running.running.occurrence == occurrence
    assert stopped.running.until is None
    assert running.running.until == end
    assert ended.running.scheduled_for == end
    assert [r.running.sequence for r in (started, stopped, running, ended)] == [1, 2, 3, 4]


async def test_stale_duplicate_and_out_of_order_events_publish_nothing(site: Site) -> None:
    """Lifecycle rules: ``updated`` only when ``update_time`` strictly increases,
    ``created`` only for an id seen the first time, and a deleted id stays deleted."""
    observer, api, _ = site
    t0 = base_time()
    x1 = dispatch_pb(1, "X", soon(-1), 30 * SECONDS, payload={"v": 1}, create_time=t0)
    x2 = revised(x1, t0 + 2 * SECONDS, payload={"v": 2})
    z1 = dispatch_pb(2, "Z", soon(60), 5 * SECONDS, create_time=t0)
    y1 = dispatch_pb(3, "Y", soon(60), 5 * SECONDS, create_time=t0)
    w1 = dispatch_pb(4, "W", soon(60), 5 * SECONDS, payload={"w": 1}, create_time=t0)
    w2 = revised(w1, t0 + 2 * SECONDS, payload={"w": 2})
    for dispatch in (x2, z1, w2):
        api.put(dispatch)
    await api.push(CREATED, x1)
    await api.push(UPDATED, x2)
    await api.push(CREATED, z1)
    await expect(
        observer,
        "1:lifecycle.created/None",
        "1:running.running/created",
        "1:lifecycle.updated/None",
        "1:running.running/reconfigured",
        "2:lifecycle.created/None",
    )

    await api.push(UPDATED, x2)  # an exact duplicate
    await api.push(UPDATED, revised(x1, t0 + 2 * SECONDS, payload={"v": 99}))  # same time
    await api.push(UPDATED, revised(x1, t0 + SECONDS, payload={"v": 98}))  # older, late
    await api.push(CREATED, x1)  # a replayed CREATED for a known id
    await api.push(DELETED, z1)  # real: lifecycle deleted
    await api.push(DELETED, z1)  # a replayed DELETED
    await api.push(UPDATED, revised(z1, t0 + 5 * SECONDS, payload={"z": 1}))  # after deletion
    await api.push(CREATED, z1)  # a late CREATED after deletion
    await api.push(DELETED, y1)  # an id never seen: remembered as deleted, nothing to say
    await api.push(UPDATED, revised(y1, t0 + 5 * SECONDS))  # cannot revive it
    await api.push(UPDATED, w2)  # first sight of an id through an UPDATED: created
    await api.push(CREATED, w1)  # its CREATED arriving after the UPDATED: stale
    _, w_created = await expect(observer, "2:lifecycle.deleted/None", "4:lifecycle.created/None")
    assert dict(w_created.message.dispatch.payload) == {"w": 2}
    assert w_created.message.dispatch.update_time == t0 + 2 * SECONDS

    await observer.expect_quiet(QUIET)
    x3 = revised(x1, t0 + 3 * SECONDS, payload={"v": 3})
    api.put(x3)
    await api.push(UPDATED, x3)
    updated, reconfigured = await expect(
        observer, "1:lifecycle.updated/None", "1:running.running/reconfigured"
    )
    assert dict(updated.message.dispatch.payload) == {"v": 3}
    assert reconfigured.message.dispatch == updated.message.dispatch
    assert reconfigured.running.sequence == 3
    assert by_dispatch(shorts(observer.received)) == by_dispatch(
        [
            "1:lifecycle.created/None",
            "1:running.running/created",
            "1:lifecycle.updated/None",
            "1:running.running/reconfigured",
            "2:lifecycle.created/None",
            "2:lifecycle.deleted/None",
            "4:lifecycle.created/None",
            "1:lifecycle.updated/None",
            "1:running.running/reconfigured",
        ]
    )


async def test_missing_from_a_relist_is_deleted_unless_it_had_finished(site: Site) -> None:
    """After a reconnect, a dispatch absent from the list that could still have been
    listed is deleted (running: also stopped); one that had ended is forgotten silently.
    Neither comes back through a later list or a late event."""
    observer, api, _ = site
    t0 = base_time()
    finished = dispatch_pb(1, "F", soon(1), SECONDS, create_time=t0)
    running = dispatch_pb(2, "R", soon(-1), 30 * SECONDS, create_time=t0)
    idle = dispatch_pb(3, "I", soon(60), 5 * SECONDS, create_time=t0)
    kept = dispatch_pb(4, "K", soon(60), 5 * SECONDS, create_time=t0)
    for dispatch in (finished, running, idle, kept):
        api.put(dispatch)
        await api.push(CREATED, dispatch)
    await expect(
        observer,
        "1:lifecycle.created/None",
        "2:lifecycle.created/None",
        "2:running.running/created",
        "3:lifecycle.created/None",
        "4:lifecycle.created/None",
        "1:running.running/started",
        "1:running.stopped/ended",
    )

    for dispatch_id in (1, 2, 3):
        api.remove(dispatch_id)
    assert api.cut_streams() == 1
    await api.wait_streams(2, WAIT)
    deleted, stopped, _ = await expect(
        observer,
        "2:lifecycle.deleted/None",
        "2:running.stopped/deleted",
        "3:lifecycle.deleted/None",
    )
    assert (
        deleted.message.dispatch == stopped.message.dispatch == observer.of(2)[0].message.dispatch
    )

    # The deleted one listed again (even newer) and a late event for the forgotten one.
    api.put(revised(running, t0 + 5 * SECONDS, payload={"back": 1}))
    assert api.cut_streams() == 1
    await api.wait_streams(3, WAIT)
    await api.push(UPDATED, finished)
    await api.push(UPDATED, revised(idle, t0 + 5 * SECONDS))
    await observer.expect_quiet(QUIET)
    marker = revised(kept, t0 + 5 * SECONDS, payload={"m": 1})
    api.put(marker)
    await api.push(UPDATED, marker)
    await expect(observer, "4:lifecycle.updated/None")
    assert not observer.pending
    assert [r.short() for r in observer.received if r.dispatch_id == 1] == [
        "1:lifecycle.created/None",
        "1:running.running/started",
        "1:running.stopped/ended",
    ]


async def test_change_while_the_stream_is_cut_arrives_once(site: Site) -> None:
    """Stream lost: reconnect, re-list, reconcile; a change (and a creation) made
    meanwhile is published once, even if the new stream delivers it again."""
    observer, api, _ = site
    t0 = base_time()
    x1 = dispatch_pb(1, "X", soon(-1), 30 * SECONDS, payload={"v": 1}, create_time=t0)
    idle = dispatch_pb(2, "I", soon(60), 5 * SECONDS, create_time=t0)
    for dispatch in (x1, idle):
        api.put(dispatch)
        await api.push(CREATED, dispatch)
    await expect(
        observer,
        "1:lifecycle.created/None",
        "1:running.running/created",
        "2:lifecycle.created/None",
    )
    reconnects = metric("dispatchd_api_reconnects_total", microgrid_id=str(MG))
    listings = api.listings

    # Cut, and change the API before the daemon can reconnect (same event loop).
    assert api.cut_streams() == 1
    x2 = revised(x1, t0 + SECONDS, payload={"v": 2})
    new = dispatch_pb(3, "N", soon(60), 5 * SECONDS, create_time=t0 + SECONDS)
    for dispatch in (x2, new):
        api.put(dispatch)
    await api.wait_streams(2, WAIT)
    updated, reconfigured, created = await expect(
        observer,
        "1:lifecycle.updated/None",
        "1:running.running/reconfigured",
        "3:lifecycle.created/None",
    )
    assert dict(updated.message.dispatch.payload) == {"v": 2}
    assert reconfigured.message.dispatch == updated.message.dispatch
    assert reconfigured.running.sequence == 2
    assert created.message.dispatch.type == "N"
    assert api.listings == listings + 1
    assert metric("dispatchd_api_reconnects_total", microgrid_id=str(MG)) == reconnects + 1

    # A server that also streams what the re-list covered: nothing twice.
    await api.push(UPDATED, x2)
    await api.push(CREATED, new)
    await observer.expect_quiet(QUIET)
    x3 = revised(x1, t0 + 2 * SECONDS, payload={"v": 3})
    api.put(x3)
    await api.push(UPDATED, x3)
    _, marker = await expect(observer, "1:lifecycle.updated/None", "1:running.running/reconfigured")
    assert dict(marker.message.dispatch.payload) == {"v": 3}
    assert shorts(observer.received).count("1:lifecycle.updated/None") == 2


async def test_every_lost_stream_that_had_worked_reconnects_promptly(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream that was up (listed) for ``STABLE_AFTER`` and is then lost
    reconnects within the first backoff step (at most 0.5 s), however often
    that happened before (``api.stream_timeout`` ends every stream). The
    threshold is 0 here so the test need not keep each stream up 10 s."""
    monkeypatch.setattr(apisync, "STABLE_AFTER", 0.0)
    observer, api, _ = site
    t0 = base_time()
    x = dispatch_pb(1, "X", soon(60), 5 * SECONDS, payload={"n": 0}, create_time=t0)
    api.put(x)
    await api.push(CREATED, x)
    await expect(observer, "1:lifecycle.created/None")
    for n in range(1, 7):
        assert api.cut_streams() == 1
        api.put(revised(x, t0 + n * SECONDS, payload={"n": n}))
        await api.wait_streams(n + 1, RECONNECT)
        (updated,) = await expect(observer, "1:lifecycle.updated/None")
        assert dict(updated.message.dispatch.payload) == {"n": n}


async def test_an_api_that_drops_every_stream_at_once_is_backed_off_from(site: Site) -> None:
    """Lost before ``STABLE_AFTER``: each reconnect waits longer (full jitter up to
    0.5 s, 1 s, 2 s, ...), rather than re-listing in a tight loop."""
    _, api, handle = site
    sync = handle.daemon._syncs[0]
    assert sync._attempt == 0
    bound = 0.5
    for n in range(1, 4):
        assert api.cut_streams() == 1
        await api.wait_streams(n + 1, bound + RECONNECT)
        assert sync._attempt == n
        bound *= 2


async def test_9_dry_run_change_while_running_reconfigures(site: Site) -> None:
    """Consequence 9 for ``dry_run``, which our local API keeps immutable: the
    actor is told again, reason ``reconfigured``, with the new flag."""
    observer, api, _ = site
    t0 = base_time()
    start = soon(1)
    x = dispatch_pb(1, "X", start, 30 * SECONDS, payload={"p": 1}, create_time=t0)
    api.put(x)
    await api.push(CREATED, x)
    _, started = await expect(observer, "1:lifecycle.created/None", "1:running.running/started")
    assert started.message.dispatch.dry_run is False
    dry = revised(x, t0 + SECONDS, is_dry_run=True)
    api.put(dry)
    await api.push(UPDATED, dry)
    _, again = await expect(observer, "1:lifecycle.updated/None", "1:running.running/reconfigured")
    assert again.message.dispatch.dry_run is True
    assert again.running.occurrence == started.running.occurrence
    assert again.running.sequence == started.running.sequence + 1

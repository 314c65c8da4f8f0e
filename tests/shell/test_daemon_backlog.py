"""Transitions and live changes do not queue behind the first sync's ``created`` backlog.

After the first sync of thousands of dispatches the daemon is ready while
their ``created`` messages are still being published. A change streamed right
after ready, and a start due right after it, must reach a consumer before that
backlog is out, each dispatch's own messages still in order (docs/architecture.md,
"Ready, and what is still being published").
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.shell.daemon_harness import QueueObserver, Received, check_stream, running_daemon
from tests.shell.scripted_api import CREATED, UPDATED, ScriptedApi, dispatch_pb, revised

BACKLOG = 4000
WAIT = 60.0
FAR = datetime(2030, 1, 1, tzinfo=UTC)


def _is(dispatch_id: int, event: str) -> Callable[[Received], bool]:
    return lambda r: r.dispatch_id == dispatch_id and r.event == event


async def test_a_live_update_and_a_start_overtake_the_created_backlog(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    exchange = unique_name("backlog")
    async with ScriptedApi() as api, QueueObserver(amqp_url, exchange) as observer:
        dispatches = [dispatch_pb(i, "BULK", FAR, timedelta(minutes=1)) for i in range(1, BACKLOG)]
        for dispatch in dispatches:
            api.put(dispatch)
        async with running_daemon(tmp_path, amqp_url, exchange, api_url=api.url) as handle:
            # Ready: the backlog is still going out. Change the last listed dispatch
            # (its own `created` still waits) and create one that starts at once.
            status, body = await handle.http_get("/readyz")
            assert status == 200
            assert json.loads(body)["unpublished"] > 0
            last = dispatches[-1]
            await api.push(UPDATED, revised(last, datetime.now(UTC), payload={"live": 1}))
            starting = dispatch_pb(BACKLOG, "LIVE", datetime.now(UTC), timedelta(minutes=1))
            api.put(starting)
            await api.push(CREATED, starting)

            update = await observer.seen(_is(last.metadata.dispatch_id, "updated"), WAIT)
            start = await observer.seen(_is(BACKLOG, "running"), WAIT)
            done = await observer.seen(
                lambda r: r.event == "created" and len(observer.received) >= BACKLOG + 2, WAIT
            )
            assert done is not None
            arrival = {id(r): n for n, r in enumerate(observer.received)}
            last_created = max(
                arrival[id(r)]
                for r in observer.received
                if r.event == "created" and r.dispatch_id < BACKLOG
            )
            assert arrival[id(update)] < last_created
            assert arrival[id(start)] < last_created
            own = [r.event for r in observer.of(last.metadata.dispatch_id)]
            assert own == ["created", "updated"]
            assert [r.event for r in observer.of(BACKLOG)] == ["created", "running"]
        check_stream(observer.received)

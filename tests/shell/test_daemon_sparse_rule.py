"""A rule too sparse to evaluate, from an API that does not refuse it, is marked
invalid at once: the daemon gets ready, counts it and syncs the rest."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from frequenz.api.dispatch.v1.dispatch_pb2 import RecurrenceRule

from tests.shell.daemon_harness import MG, QueueObserver, running_daemon, soon
from tests.shell.scripted_api import ScriptedApi, dispatch_pb

WAIT = 15.0


async def test_sparse_rule_is_invalid_without_stalling_the_daemon(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    exchange = unique_name("sparse")
    sparse = RecurrenceRule(
        freq=RecurrenceRule.FREQUENCY_MINUTELY,
        interval=61,
        byminutes=[53, 40],
        byhours=[5],
        byweekdays=[RecurrenceRule.WEEKDAY_TUESDAY],
        bymonthdays=[1],
        end_criteria=RecurrenceRule.EndCriteria(count=4096),
    )
    async with ScriptedApi() as api, QueueObserver(amqp_url, exchange) as observer:
        api.put(dispatch_pb(1, "SPARSE", soon(60), timedelta(minutes=5), recurrence=sparse))
        api.put(dispatch_pb(2, "PLAIN", soon(3600), timedelta(minutes=5)))
        # running_daemon waits at most 15 s for readiness; the rule alone took 16 s before.
        async with running_daemon(tmp_path, amqp_url, exchange, api_url=api.url) as handle:
            for dispatch_id in (1, 2):
                await observer.seen(lambda r, i=dispatch_id: r.is_(i, "created"), WAIT)
            status, body = await handle.http_get("/metrics")
            assert status == 200
            invalid = re.search(
                rf'dispatchd_dispatches{{microgrid_id="{MG}",state="invalid"}} (\S+)',
                body.decode(),
            )
            assert invalid is not None and float(invalid.group(1)) == 1.0

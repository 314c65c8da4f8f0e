"""A second ``dispatchd run`` (SQLite store) on the same exchange is refused.

Two real processes: the first serves the exchange; the second, with another
state dir but reading the same dispatches (its embedded API opens the first
one's database), would publish a second ``created`` for each of them. It
must stop with one error line naming the exchange and exit 1, without a
traceback and before it publishes anything. A cluster replica (PostgreSQL
store) beside the SQLite-mode process is refused the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import aio_pika
import pytest
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch.types import TargetIds

from tests.conftest import temporary_database
from tests.shell.test_daemon_crash import MICROGRID, DaemonProcess, _at, observed

MARKER = {"dispatch": {"id": 0}, "kind": "marker", "event": "sent"}


@pytest.mark.parametrize("second_is", ["sqlite", "replica"])
async def test_a_second_daemon_on_the_same_exchange_stops_before_publishing(
    second_is: str,
    amqp_url: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    clean_env: dict[str, str],
    postgres_server: str,
) -> None:
    """The second is another SQLite-mode process, or a cluster replica (which shares the
    RPC queue with other replicas only)."""
    exchange = unique_name("one-writer").translate(str.maketrans("[]", "__"))
    env = {
        **clean_env,
        "DISPATCHD_AMQP__URL": amqp_url,
        "DISPATCHD_AMQP__EXCHANGE": exchange,
        "DISPATCHD_STATE__DIR": str(tmp_path / "first"),
        "DISPATCHD_HTTP__LISTEN": "127.0.0.1:0",
        "DISPATCHD_API__LOCAL__LISTEN": "127.0.0.1:0",
        "DISPATCHD_MICROGRID_IDS": f"[{MICROGRID}]",
        "DISPATCHD_LOG__FORMAT": "json",
        "DISPATCHD_LOG__LEVEL": "INFO",
    }
    async with observed(amqp_url, exchange) as observer:
        first = DaemonProcess(env)
        try:
            await first.start()
            client = first.client()
            await client.create(
                MicrogridId(MICROGRID), "ONE", _at(3600), timedelta(seconds=60), TargetIds(1)
            )
            await observer.wait_until(
                "the first created", lambda: len(observer.distinct()) == 1, 30
            )

            second_env = {
                **env,
                "DISPATCHD_STATE__DIR": str(tmp_path / "second"),
                "DISPATCHD_API__LOCAL__DATABASE": str(tmp_path / "first" / "dispatches.sqlite3"),
            }
            async with contextlib.AsyncExitStack() as stack:
                if second_is == "replica":
                    database = await stack.enter_async_context(temporary_database(postgres_server))
                    second_env["DISPATCHD_STATE__URL"] = database
                second = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "dispatchd",
                    "run",
                    env=second_env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                out, err = await asyncio.wait_for(second.communicate(), 60)
            assert second.returncode == 1
            text = (out + err).decode()
            assert "Traceback" not in text
            lines = [json.loads(line) for line in text.splitlines()]
            errors = [line for line in lines if line["level"] in ("error", "critical")]
            assert len(errors) == 1, errors
            assert f"exchange {exchange!r}" in errors[0]["error"]
            says = "another dispatchd" if second_is == "sqlite" else "a cluster replica cannot"
            assert says in errors[0]["error"]
            assert not [line for line in lines if line["event"] == "first sync done"]

            # Whatever the second process published is on the queue before this marker.
            connection = await aio_pika.connect(amqp_url)
            async with connection:
                channel = await connection.channel()
                target = await channel.get_exchange(exchange)
                await target.publish(
                    aio_pika.Message(json.dumps(MARKER).encode(), message_id="marker"),
                    routing_key=f"microgrid.{MICROGRID}.marker",
                )
            await observer.wait_until(
                "the marker", lambda: observer.deliveries[-1].message_id == "marker", 30
            )
            labels = [d.label for d in observer.deliveries]
            assert labels == ["lifecycle.created", "marker.sent"], labels
            assert first.synced.is_set()
        finally:
            await first.close()

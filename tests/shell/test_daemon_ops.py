"""What operators and actors touch around ``dispatchd run``: routing of awkward types,
the HTTP endpoints and metrics, ``dispatchd tail`` and ``dispatchd schedule``."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import aio_pika
from frequenz.client.dispatch.recurrence import EndCriteria, Frequency, RecurrenceRule
from frequenz.client.dispatch.types import TargetIds
from prometheus_client.parser import text_string_to_metric_families

from dispatchd import __version__
from dispatchd.core import wire
from dispatchd.core.model import Dispatch
from dispatchd.schedule import print_schedule
from dispatchd.tail import tail
from tests.shell.daemon_harness import (
    MG,
    QueueObserver,
    metric,
    mg,
    running_daemon,
    soon,
    whole_second,
)

WAIT = 15.0

AWKWARD_TYPES = {
    # type: (its escaped routing word, a similar type its binding must not match)
    "site.a": ("site%2Ea", "site"),
    "*": ("%2A", "x"),
    "#": ("%23", "anything"),
    "peak shaving": ("peak%20shaving", "peak"),
    "Spitzenlast ⚡ Ü": ("Spitzenlast%20%E2%9A%A1%20%C3%9C", "Spitzenlast"),
    "50%": ("50%25", "50"),
}


async def test_awkward_types_are_routed_under_their_escaped_word(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    """A queue bound with ``wire.binding_key`` for a type gets exactly that type's messages."""
    exchange = unique_name("e2e")
    async with (
        QueueObserver(amqp_url, exchange) as observer,
        running_daemon(tmp_path, amqp_url, exchange) as handle,
        await aio_pika.connect(amqp_url) as connection,
    ):
        channel = await connection.channel()
        target = await channel.get_exchange(exchange)
        queues = {}
        for dispatch_type in AWKWARD_TYPES:
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await queue.bind(target, wire.binding_key(MG, "lifecycle", "created", dispatch_type))
            queues[dispatch_type] = queue
        every_type = [*AWKWARD_TYPES, *(similar for _, similar in AWKWARD_TYPES.values())]
        ids = {}
        for dispatch_type in every_type:
            created = await handle.client.create(
                mg(), dispatch_type, soon(600), timedelta(seconds=1), TargetIds(1)
            )
            ids[dispatch_type] = int(created.id)
        # Confirmed and delivered to the catch-all, so routed into every queue already.
        arrived = await observer.take(len(every_type), WAIT)
        by_id = {r.dispatch_id: r for r in arrived}
        for dispatch_type, (word, _) in AWKWARD_TYPES.items():
            received = by_id[ids[dispatch_type]]
            assert received.routing_key == f"microgrid.{MG}.lifecycle.created.{word}"
            assert received.headers["dispatch_type"] == dispatch_type
            assert received.message.dispatch.type == dispatch_type
            got = []
            while (message := await queues[dispatch_type].get(no_ack=True, fail=False)) is not None:
                got.append(json.loads(message.body)["dispatch"]["id"])
            assert got == [ids[dispatch_type]], dispatch_type


def families(text: str) -> dict[str, list[dict[str, str]]]:
    """Metric name -> the label sets of its samples (histograms by their base name)."""
    found: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "le"}
            name = family.name if family.type != "counter" else f"{family.name}_total"
            found.setdefault(name, []).append(labels)
    return found


async def test_http_health_readiness_and_every_metric(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    exchange = unique_name("e2e")
    # Only running messages are bound, so lifecycle ones are unroutable (and counted).
    async with (
        QueueObserver(amqp_url, exchange, ["microgrid.*.running.#"]) as observer,
        running_daemon(tmp_path, amqp_url, exchange) as handle,
    ):
        for path in ("/livez", "/healthz"):
            assert await handle.http_get(path) == (200, b"ok\n")
        status, body = await handle.http_get("/readyz")
        assert (status, json.loads(body)) == (200, {"ready": True, "missing": [], "unpublished": 0})
        assert (await handle.http_get("/nothing"))[0] == 404
        counters = {
            "running": (
                "dispatchd_messages_published_total",
                {"kind": "running", "event": "running"},
            ),
            "stopped": (
                "dispatchd_messages_published_total",
                {"kind": "running", "event": "stopped"},
            ),
            "unroutable": ("dispatchd_messages_unroutable_total", {"kind": "lifecycle"}),
            "rpc": ("dispatchd_rpc_requests_total", {"method": "snapshot", "outcome": "ok"}),
            "lateness": ("dispatchd_transition_lateness_seconds_count", {"kind": "running"}),
        }
        before = {key: metric(name, **labels) for key, (name, labels) in counters.items()}
        created = await handle.client.create(
            mg(), "METRICS", soon(0.5), timedelta(seconds=1), TargetIds(1)
        )
        await observer.wait_for(lambda r: r.is_(int(created.id), "stopped"), WAIT)
        async with await aio_pika.connect(amqp_url) as connection:
            channel = await connection.channel()
            replies = await channel.declare_queue(exclusive=True)
            await channel.default_exchange.publish(
                aio_pika.Message(wire.encode_snapshot_request(MG), reply_to=replies.name),
                routing_key=f"{exchange}.rpc",
            )
            async with asyncio.timeout(WAIT), replies.iterator() as replies_iterator:
                async for reply in replies_iterator:
                    await reply.ack()
                    break
        status, body = await handle.http_get("/metrics")
        after = {key: metric(name, **labels) for key, (name, labels) in counters.items()}
    assert status == 200
    assert {key: after[key] - before[key] for key in counters} == {
        "running": 1,
        "stopped": 1,
        "unroutable": 1,  # the lifecycle ``created``
        "rpc": 1,
        "lateness": 2,  # started and ended
    }
    found = families(body.decode())
    expected: dict[str, list[dict[str, str]]] = {
        "dispatchd_dispatches": [
            {"microgrid_id": str(MG), "state": state}
            for state in ("scheduled", "running", "finished", "inactive", "invalid")
        ],
        "dispatchd_messages_published_total": [
            {"kind": "running", "event": "running"},
            {"kind": "running", "event": "stopped"},
        ],
        "dispatchd_messages_unroutable_total": [{"kind": "lifecycle"}],
        "dispatchd_outbox_messages": [{}],
        "dispatchd_transition_lateness_seconds": [{"kind": "running"}],
        "dispatchd_api_stream_up": [{"microgrid_id": str(MG)}],
        "dispatchd_api_reconnects_total": [{"microgrid_id": str(MG)}],
        "dispatchd_api_last_sync_timestamp_seconds": [{"microgrid_id": str(MG)}],
        "dispatchd_broker_up": [{}],
        "dispatchd_rpc_requests_total": [{"method": "snapshot", "outcome": "ok"}],
        "dispatchd_build_info": [{"version": __version__}],
    }
    for name, label_sets in expected.items():
        assert name in found, name
        for labels in label_sets:
            assert labels in found[name], (name, labels, found[name])
    values = {
        (family.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    assert values[("dispatchd_dispatches", (("microgrid_id", "7"), ("state", "finished")))] >= 1
    assert values[("dispatchd_broker_up", ())] == 1
    assert values[("dispatchd_api_stream_up", (("microgrid_id", "7"),))] == 1
    # Alone on SQLite it owns every configured microgrid, as a cluster does together.
    assert values[("dispatchd_microgrids_configured", ())] == 1
    assert values[("dispatchd_microgrids_owned", ())] == 1


class Lines(io.StringIO):
    """What ``tail`` prints, with a way to wait for lines."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def write(self, text: str) -> int:
        self.changed.set()
        return super().write(text)

    def lines(self) -> list[str]:
        return self.getvalue().splitlines()

    async def wait_lines(self, count: int, timeout: float = WAIT) -> list[str]:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while len(self.lines()) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.lines()


async def test_tail_prints_one_line_per_message(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    exchange = unique_name("e2e")
    readable, raw = Lines(), Lines()
    stop = asyncio.Event()
    async with (
        QueueObserver(amqp_url, exchange) as observer,
        running_daemon(tmp_path, amqp_url, exchange) as handle,
    ):
        bound = [asyncio.Event(), asyncio.Event()]
        tails = [
            asyncio.create_task(
                tail(
                    amqp_url,
                    exchange,
                    ["microgrid.#"],
                    raw_json=False,
                    out=readable,
                    stop=stop,
                    bound=bound[0],
                )
            ),
            asyncio.create_task(
                tail(
                    amqp_url,
                    exchange,
                    [f"microgrid.{MG}.running.*.*"],
                    raw_json=True,
                    out=raw,
                    stop=stop,
                    bound=bound[1],
                )
            ),
        ]
        try:
            await asyncio.wait_for(asyncio.gather(*(b.wait() for b in bound)), WAIT)
            created = await handle.client.create(
                mg(), "TAILED", "NOW", timedelta(seconds=1), TargetIds(1)
            )
            d = int(created.id)
            lines = await readable.wait_lines(3)
            raw_lines = await raw.wait_lines(2)
            await observer.take(3, WAIT)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tails), WAIT)
    assert len(lines) == 3
    for line, words in zip(
        lines,
        [
            ["lifecycle.created", f"id={d}", "mg=7", "type='TAILED'"],
            ["running.running", f"id={d}", "reason=created", "seq=1", "until=", "late="],
            ["running.stopped", f"id={d}", "reason=ended", "seq=2", "until=-"],
        ],
        strict=True,
    ):
        for word in words:
            assert word in line, (word, line)
    running_bodies = [r.body.decode() for r in observer.received if r.kind == "running"]
    assert raw_lines == running_bodies


async def test_schedule_prints_the_occurrences_the_daemon_would_run(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path, clean_env: dict[str, str]
) -> None:
    exchange = unique_name("e2e")
    start = whole_second(60)
    async with (
        QueueObserver(amqp_url, exchange),  # removes the exchange afterwards
        running_daemon(tmp_path, amqp_url, exchange) as handle,
    ):
        client = handle.client
        hourly = await client.create(
            mg(),
            "HOURLY",
            start,
            timedelta(minutes=10),
            TargetIds(1),
            recurrence=RecurrenceRule(
                frequency=Frequency.HOURLY, end_criteria=EndCriteria(count=3)
            ),
        )
        once = await client.create(
            mg(), "ONCE", start + timedelta(minutes=30), timedelta(minutes=5), TargetIds(2)
        )
        forever = await client.create(mg(), "FOREVER", start, None, TargetIds(3), active=False)
        listed = [Dispatch.from_client(d, MG) async for page in client.list(mg()) for d in page]
        assert handle.daemon.api_url is not None
        window = (start - timedelta(minutes=1), start + timedelta(hours=5))
        out, err = io.StringIO(), io.StringIO()
        print_schedule(listed, *window, out, err)
        env = clean_env | {
            "DISPATCHD_API__URL": handle.daemon.api_url,
            "DISPATCHD_MICROGRID_IDS": f"[{MG}]",
        }
        cli = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "dispatchd",
                "schedule",
                "--microgrid",
                str(MG),
                "--from",
                window[0].isoformat(),
                "--to",
                window[1].isoformat(),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=os.getcwd(),
        )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == out.getvalue()
    assert err.getvalue() == ""
    rows = [line.split() for line in out.getvalue().splitlines()[1:]]
    fmt = wire.format_time
    h, o, f = str(int(hourly.id)), str(int(once.id)), str(int(forever.id))
    ten = timedelta(minutes=10)
    assert rows == [
        [fmt(start), fmt(start + ten), h, "HOURLY"],
        [fmt(start), "never", f, "FOREVER", "(inactive:", "will", "not", "run)"],
        [fmt(start + timedelta(minutes=30)), fmt(start + timedelta(minutes=35)), o, "ONCE"],
        [fmt(start + timedelta(hours=1)), fmt(start + timedelta(hours=1) + ten), h, "HOURLY"],
        [fmt(start + timedelta(hours=2)), fmt(start + timedelta(hours=2) + ten), h, "HOURLY"],
    ]


async def test_each_microgrid_is_synced_and_routed_under_its_own_id(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    exchange = unique_name("e2e")
    async with (
        QueueObserver(amqp_url, exchange, ["microgrid.8.#"]) as only_8,
        running_daemon(tmp_path, amqp_url, exchange, microgrid_ids=(MG, 8)) as handle,
    ):
        # Published before 8's: a binding that matched it would show it first.
        await handle.client.create(mg(), "T", "NOW", timedelta(seconds=30), TargetIds(1))
        on_8 = await handle.client.create(mg(8), "T", "NOW", timedelta(seconds=30), TargetIds(1))
        created, running = await only_8.take(2, WAIT)
    assert created.is_(int(on_8.id), "created") and running.is_(int(on_8.id), "running")
    assert created.routing_key == "microgrid.8.lifecycle.created.T"
    assert running.routing_key == "microgrid.8.running.running.T"
    assert created.headers["microgrid_id"] == running.message.dispatch.microgrid_id == 8
    assert all(r.message.dispatch.microgrid_id == 8 for r in only_8.received)

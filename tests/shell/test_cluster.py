"""Three replicas on one PostgreSQL database, as separate ``dispatchd run`` processes.

They share 12 microgrids (4 each) and one dispatch API. One replica is killed
with SIGKILL just before every microgrid's dispatch is due: the others take
its microgrids over within ``lease_seconds + 5 s`` and publish the starts it
missed, late (reason ``resumed``, ``scheduled_for`` the due instant); then a
second replica gets SIGTERM and hands its microgrids over at once, so the
last one publishes every stop on time. Over the whole history: nothing lost,
duplicates only with identical ``message_id``, ``created`` once per dispatch.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.types import TargetIds
from prometheus_client.parser import text_string_to_metric_families

from dispatchd.core import wire
from dispatchd.localapi.server import LocalApiServer
from dispatchd.settings import LocalApiConfig
from tests.shell.daemon_harness import until
from tests.shell.test_daemon_crash import (
    DaemonProcess,
    _at,
    assert_consistent,
    observed,
)
from tests.shell.test_daemon_rpc import RpcClient
from tests.tcpproxy import TcpProxy

MICROGRIDS = list(range(1, 13))
LEASE_SECONDS = 3.0
REPLICAS = ("replica-1", "replica-2", "replica-3")


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[int]:
    """One dispatch API for every replica (no keys: any is accepted)."""
    server = LocalApiServer.from_config(
        LocalApiConfig(listen="127.0.0.1:0", database=tmp_path / "api.sqlite3")
    )
    port = await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


async def owners(database: str) -> dict[int, str]:
    """Microgrid -> owner of its unexpired lease, by the database's clock."""
    connection = await asyncpg.connect(database)
    try:
        rows = await connection.fetch(
            "SELECT microgrid_id, owner FROM leases WHERE owner IS NOT NULL AND expires_at > now()"
        )
    finally:
        await connection.close()
    return {int(row["microgrid_id"]): str(row["owner"]) for row in rows}


async def wait_owned(
    database: str, wanted: Callable[[dict[int, str]], bool], within: float
) -> dict[int, str]:
    """Poll the lease table (it signals nothing) until ``wanted`` holds."""
    seen: dict[int, str] = {}
    try:
        async with asyncio.timeout(within):
            while True:
                seen = await owners(database)
                if wanted(seen):
                    return seen
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"leases not as wanted within {within} s: {seen}") from None


def split(seen: dict[int, str], *replicas: str, total: int = len(MICROGRIDS)) -> bool:
    """Every microgrid owned, each replica at its fair share."""
    counts = [sum(1 for owner in seen.values() if owner == replica) for replica in replicas]
    share = -(-total // len(replicas))
    return len(seen) == total and all(count == share for count in counts)


async def ready(http: aiohttp.ClientSession, base_url: str, within: float = 30) -> None:
    """Poll ``/readyz`` (a state, not an event) until it answers 200."""
    text = ""
    try:
        async with asyncio.timeout(within):
            while True:
                async with http.get(f"{base_url}/readyz") as response:
                    if response.status == 200:
                        return
                    text = await response.text()
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"{base_url} not ready within {within} s: {text}") from None


def gauges(exposition: str) -> dict[str, float]:
    """The unlabelled samples of a /metrics text, by name."""
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if not sample.labels
    }


def logged(daemon: DaemonProcess, event: str) -> list[dict[str, Any]]:
    return [line for line in daemon.log if line.get("event") == event]


def replica_env(
    amqp_url: str,
    exchange: str,
    database: str,
    api: int,
    microgrids: list[int],
    base: dict[str, str],
) -> dict[str, str]:
    return {
        **base,
        "DISPATCHD_AMQP__URL": amqp_url,
        "DISPATCHD_AMQP__EXCHANGE": exchange,
        "DISPATCHD_STATE__URL": database,
        "DISPATCHD_CLUSTER__LEASE_SECONDS": str(LEASE_SECONDS),
        "DISPATCHD_API__URL": f"grpc://127.0.0.1:{api}?ssl=false",
        "DISPATCHD_API__AUTH_KEY": "any",
        "DISPATCHD_HTTP__LISTEN": "127.0.0.1:0",
        "DISPATCHD_MICROGRID_IDS": json.dumps(microgrids),
        "DISPATCHD_SHUTDOWN_TIMEOUT": "5",
        "DISPATCHD_LOG__FORMAT": "json",
        "DISPATCHD_LOG__LEVEL": "INFO",
    }


async def test_a_replica_cut_from_the_database_stops_and_rejoins_after_the_cut(
    amqp_url: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    clean_env: dict[str, str],
    postgres_url: str,
    api: int,
) -> None:
    microgrids = [1, 2, 3, 4]
    exchange = unique_name("cut").translate(str.maketrans("[]", "__"))
    server = urlsplit(postgres_url)
    async with TcpProxy(server.hostname or "127.0.0.1", server.port or 5432) as proxy:
        proxied = urlunsplit(server._replace(netloc=f"{server.username}@127.0.0.1:{proxy.port}"))
        replicas = {
            name: DaemonProcess(
                {
                    **replica_env(amqp_url, exchange, url, api, microgrids, clean_env),
                    "DISPATCHD_CLUSTER__REPLICA_ID": name,
                    "DISPATCHD_STATE__DIR": str(tmp_path / name),
                }
            )
            for name, url in (("steady", postgres_url), ("cut", proxied))
        }
        async with observed(amqp_url, exchange) as observer:
            try:
                for replica in replicas.values():
                    await replica.start()
                await wait_owned(
                    postgres_url, lambda seen: split(seen, "steady", "cut", total=4), 60
                )
                client = DispatchApiClient(
                    server_url=f"grpc://127.0.0.1:{api}?ssl=false", auth_key="any"
                )
                due = _at(12)
                ids = {}
                for microgrid_id in microgrids:
                    created = await client.create(
                        MicrogridId(microgrid_id), "CUT", due, timedelta(seconds=60), TargetIds(1)
                    )
                    ids[int(created.id)] = microgrid_id
                await observer.wait_until(
                    "a created per dispatch", lambda: len(observer.distinct()) == len(ids), 30
                )
                cut = replicas["cut"]
                held = {mg for mg, owner in (await owners(postgres_url)).items() if owner == "cut"}

                await proxy.refuse()
                cut_at = time.time()
                await wait_owned(
                    postgres_url,
                    lambda seen: set(seen.values()) == {"steady"} and len(seen) == 4,
                    15,
                )
                lost = {
                    line["microgrid_id"]: datetime.fromisoformat(line["timestamp"]).timestamp()
                    for line in logged(cut, "lease lost")
                }
                assert set(lost) == held
                for at in lost.values():  # by its own clock: no renewal for lease_seconds
                    assert at - cut_at <= LEASE_SECONDS + 1.5, f"dropped {at - cut_at:.1f} s after"
                await observer.wait_until(
                    "every start", lambda: all(observer.running(i) for i in ids), 30
                )
                for dispatch_id in ids:
                    ((event, _, scheduled_for), *_) = observer.running(dispatch_id)
                    assert (event, scheduled_for) == ("running", due)

                await proxy.accept()  # healed: it rejoins and gets its share by hand-over
                await wait_owned(
                    postgres_url, lambda seen: split(seen, "steady", "cut", total=4), 30
                )
                dropped_at = max(lost.values())
                rejoined_at = min(
                    datetime.fromisoformat(line["timestamp"]).timestamp()
                    for line in logged(cut, "lease acquired")
                    if datetime.fromisoformat(line["timestamp"]).timestamp() > dropped_at
                )
                silent = [
                    line
                    for line in cut.log
                    if line.get("event") == "queued for publishing"
                    and dropped_at
                    < datetime.fromisoformat(line["timestamp"]).timestamp()
                    < rejoined_at
                ]
                assert silent == [], "published while it owned nothing"
                assert_consistent(observer, ids)
            finally:
                for replica in replicas.values():
                    await replica.close()


async def test_a_killed_replica_is_taken_over_and_a_stopped_one_hands_over_at_once(
    amqp_url: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    clean_env: dict[str, str],
    postgres_url: str,
    api: int,
) -> None:
    exchange = unique_name("cluster").translate(str.maketrans("[]", "__"))
    base = {
        **clean_env,
        "DISPATCHD_AMQP__URL": amqp_url,
        "DISPATCHD_AMQP__EXCHANGE": exchange,
        "DISPATCHD_STATE__URL": postgres_url,
        "DISPATCHD_CLUSTER__LEASE_SECONDS": str(LEASE_SECONDS),
        "DISPATCHD_API__URL": f"grpc://127.0.0.1:{api}?ssl=false",
        "DISPATCHD_API__AUTH_KEY": "any",
        "DISPATCHD_HTTP__LISTEN": "127.0.0.1:0",
        "DISPATCHD_MICROGRID_IDS": json.dumps(MICROGRIDS),
        "DISPATCHD_SHUTDOWN_TIMEOUT": "5",
        "DISPATCHD_LOG__FORMAT": "json",
        "DISPATCHD_LOG__LEVEL": "INFO",
    }
    replicas = {
        name: DaemonProcess(
            {
                **base,
                "DISPATCHD_CLUSTER__REPLICA_ID": name,
                "DISPATCHD_STATE__DIR": str(tmp_path / name),
            }
        )
        for name in REPLICAS
    }
    async with observed(amqp_url, exchange) as observer:
        try:
            for replica in replicas.values():  # each gets its share by hand-over
                await replica.start()
            await wait_owned(postgres_url, lambda seen: split(seen, *REPLICAS), 60)

            # Each replica is ready (its own microgrids synced) and shows its share.
            shares = await owners(postgres_url)
            async with aiohttp.ClientSession() as http:
                for name, replica in replicas.items():
                    (listening,) = logged(replica, "http listening")
                    base_url = f"http://{listening['address']}"
                    await ready(http, base_url)  # a microgrid just taken may still be listing
                    async with http.get(f"{base_url}/api/v1/status") as response:
                        document = await response.json()
                    mine = sorted(mg for mg, owner in shares.items() if owner == name)
                    assert document["cluster"]["replica_id"] == name
                    assert document["cluster"]["owned"] == mine
                    assert [m["microgrid_id"] for m in document["microgrids"]] == mine
                    assert document["ready"] is True, document["missing"]
                    # What DispatchdMicrogridUnowned sums over the replicas.
                    async with http.get(f"{base_url}/metrics") as response:
                        exported = gauges(await response.text())
                    assert exported["dispatchd_microgrids_configured"] == len(MICROGRIDS)
                    assert exported["dispatchd_microgrids_owned"] == len(mine)

            # Synced as soon as each owner listed its microgrid, even with nothing to commit
            # (the owner stores that right after its ready state says so).
            async with RpcClient(amqp_url, exchange) as rpc:
                for microgrid_id in MICROGRIDS:
                    async with asyncio.timeout(10):
                        while not (
                            reply := await rpc.call(wire.encode_snapshot_request(microgrid_id))
                        )["synced"]:
                            assert reply["dispatches"] == [], reply
                for _ in range(3):
                    for microgrid_id in MICROGRIDS:
                        reply = await rpc.call(wire.encode_snapshot_request(microgrid_id))
                        assert (reply["synced"], reply["dispatches"]) == (True, []), reply

            client = DispatchApiClient(
                server_url=f"grpc://127.0.0.1:{api}?ssl=false", auth_key="any"
            )
            due = _at(10)
            ends = due + timedelta(seconds=25)
            ids = {}
            for microgrid_id in MICROGRIDS:
                created = await client.create(
                    MicrogridId(microgrid_id), "CLUSTER", due, ends - due, TargetIds(1)
                )
                ids[int(created.id)] = microgrid_id
            await observer.wait_until(
                "a created per dispatch", lambda: len(observer.distinct()) == len(ids), 30
            )
            seen = await owners(postgres_url)
            assert split(seen, *REPLICAS), seen  # nothing moved meanwhile
            # Any replica answers for any microgrid: from its engine or from the store.
            async with RpcClient(amqp_url, exchange) as rpc:
                for _ in range(3):
                    for dispatch_id, microgrid_id in ids.items():
                        reply = await rpc.call(wire.encode_snapshot_request(microgrid_id))
                        assert reply["synced"] is True, reply
                        assert [
                            (entry["dispatch"]["id"], entry["running"], entry["sequence"])
                            for entry in reply["dispatches"]
                        ] == [(dispatch_id, False, 0)], reply
            victim = replicas["replica-1"]
            victims = {mg for mg, owner in seen.items() if owner == "replica-1"}

            await until(due - timedelta(seconds=1))
            killed_at = victim.kill()
            await victim.wait_dead()
            await observer.wait_until(
                "every start",
                lambda: all(observer.running(dispatch_id) for dispatch_id in ids),
                LEASE_SECONDS + 10,
            )
            taken = await wait_owned(
                postgres_url, lambda seen: split(seen, "replica-2", "replica-3"), 15
            )
            assert not {mg for mg, owner in taken.items() if owner == "replica-1"}
            for dispatch_id, microgrid_id in ids.items():
                (first, *_) = [
                    d.body for d in observer.of(dispatch_id) if d.body["kind"] == "running"
                ]
                assert first["event"] == "running"
                assert datetime.fromisoformat(first["scheduled_for"]) == due
                emitted = datetime.fromisoformat(first["emitted_at"])
                if microgrid_id in victims:
                    assert first["reason"] == "resumed", first
                    late = emitted.timestamp() - killed_at
                    assert late <= LEASE_SECONDS + 5, f"taken over after {late:.1f} s"
                else:
                    assert first["reason"] == "started", first

            # SIGTERM: replica-2 hands over at once (released, not expired).
            leaving = replicas["replica-2"]
            handed = {mg for mg, owner in taken.items() if owner == "replica-2"}
            terminated_at = time.time()
            assert leaving._process is not None
            leaving._process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(leaving._process.wait(), 30) == 0
            await wait_owned(
                postgres_url,
                lambda seen: set(seen) == set(MICROGRIDS) and set(seen.values()) == {"replica-3"},
                LEASE_SECONDS + 5,
            )
            last = replicas["replica-3"]
            acquired = {
                line["microgrid_id"]: line
                for line in logged(last, "lease acquired")
                if line.get("previous_owner") == "replica-2"
            }
            assert set(acquired) >= handed
            for line in acquired.values():
                at = datetime.fromisoformat(line["timestamp"]).timestamp()
                assert at - terminated_at < LEASE_SECONDS, "waited for the expiry"
            released = {
                line["microgrid_id"]
                for line in logged(leaving, "lease released")
                if datetime.fromisoformat(line["timestamp"]).timestamp() >= terminated_at
            }
            assert released == handed

            await observer.wait_until(
                "every stop",
                lambda: all(
                    [event for event, _, _ in observer.running(dispatch_id)][-1:] == ["stopped"]
                    for dispatch_id in ids
                ),
                60,
            )
            for dispatch_id in ids:
                stops = [
                    (r, at) for event, r, at in observer.running(dispatch_id) if event == "stopped"
                ]
                assert stops == [("ended", ends)], (dispatch_id, stops)
            assert_consistent(observer, ids)
        finally:
            for replica in replicas.values():
                await replica.close()


async def test_a_fourth_replica_gets_its_share_by_hand_over_while_starts_fall_due(
    amqp_url: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    clean_env: dict[str, str],
    postgres_url: str,
    api: int,
) -> None:
    exchange = unique_name("join").translate(str.maketrans("[]", "__"))
    names = (*REPLICAS, "replica-4")
    replicas = {
        name: DaemonProcess(
            {
                **replica_env(amqp_url, exchange, postgres_url, api, MICROGRIDS, clean_env),
                "DISPATCHD_CLUSTER__REPLICA_ID": name,
                "DISPATCHD_STATE__DIR": str(tmp_path / name),
            }
        )
        for name in names
    }
    async with observed(amqp_url, exchange) as observer:
        try:
            for name in REPLICAS:
                await replicas[name].start()
            await wait_owned(postgres_url, lambda seen: split(seen, *REPLICAS), 60)
            client = DispatchApiClient(
                server_url=f"grpc://127.0.0.1:{api}?ssl=false", auth_key="any"
            )
            # Starts every second from 4 s on: some fall before, some during and some
            # after the hand-overs the fourth replica causes.
            starts = {}
            first = _at(4, whole=True)
            for microgrid_id in MICROGRIDS:
                start = first + timedelta(seconds=microgrid_id % 6)
                created = await client.create(
                    MicrogridId(microgrid_id), "JOIN", start, timedelta(seconds=30), TargetIds(1)
                )
                starts[int(created.id)] = start
            await observer.wait_until(
                "a created per dispatch", lambda: len(observer.distinct()) == len(starts), 30
            )
            await until(first - timedelta(seconds=1))
            await replicas["replica-4"].start()
            moved = await wait_owned(postgres_url, lambda seen: split(seen, *names), 30)
            assert sum(1 for owner in moved.values() if owner == "replica-4") == 3
            await observer.wait_until(
                "every start", lambda: all(observer.running(i) for i in starts), 30
            )
            for dispatch_id, start in starts.items():
                running = observer.running(dispatch_id)
                assert [(event, at) for event, _, at in running] == [("running", start)], running
            handed = [
                line for r in REPLICAS for line in logged(replicas[r], "microgrid handed over")
            ]
            assert len(handed) >= 3
            assert_consistent(observer, starts)
        finally:
            for replica in replicas.values():
                await replica.close()

"""``dispatchd cluster status``: replicas and leases from the database, as tables or JSON."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import asyncpg

from dispatchd.store.postgres import PostgresStore


async def cluster_status(*args: str, state_url: str | None) -> tuple[int, str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("DISPATCHD_")}
    env["DISPATCHD_MICROGRID_IDS"] = "[1, 2, 3, 4]"
    if state_url is not None:
        env["DISPATCHD_STATE__URL"] = state_url
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatchd",
        "cluster",
        "status",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def _a_cluster(url: str) -> None:
    store = await PostgresStore.open(url, version="9.9.9")
    try:
        await store.renew("replica-a", 30, [])
        await store.renew("replica-b", 30, [])
        await store.acquire("replica-a", [1, 2], lease_seconds=30)
        await store.acquire("replica-b", [3], lease_seconds=30)
        await store.release("replica-b", 3, 1)
    finally:
        await store.close()


async def test_status_as_json_lists_replicas_and_every_configured_microgrid(
    postgres_url: str,
) -> None:
    await _a_cluster(postgres_url)
    code, out, err = await cluster_status("--json", state_url=postgres_url)
    assert (code, err) == (0, "")
    document = json.loads(out)
    assert [
        (r["replica_id"], r["live"], r["owned"], r["version"]) for r in document["replicas"]
    ] == [("replica-a", True, 2, "9.9.9"), ("replica-b", True, 0, "9.9.9")]
    assert all(0 <= r["heartbeat_age_seconds"] < 30 for r in document["replicas"])
    leases = {lease["microgrid_id"]: lease for lease in document["leases"]}
    assert sorted(leases) == [1, 2, 3, 4]
    assert (leases[1]["owner"], leases[1]["held"], leases[1]["term"]) == ("replica-a", True, 1)
    assert 0 < leases[1]["expires_in_seconds"] <= 30
    assert (leases[3]["owner"], leases[3]["held"], leases[3]["previous_owner"]) == (
        None,
        False,
        "replica-b",
    )
    assert (leases[4]["term"], leases[4]["expires_in_seconds"]) == (0, None)  # never leased


async def test_status_as_tables_for_people(postgres_url: str) -> None:
    await _a_cluster(postgres_url)
    code, out, _ = await cluster_status(state_url=postgres_url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "replicas: 2 live of 2"
    assert lines[1].split() == ["REPLICA", "STATE", "HEARTBEAT", "OWNED", "VERSION"]
    assert lines[2].split()[:2] == ["replica-a", "live"] and lines[2].split()[-2:] == ["2", "9.9.9"]
    assert "leases: 2 held, 2 free or expired" in lines
    rows = {line.split()[0]: line for line in lines if line.strip()[:1].isdigit()}
    assert rows["1"].split()[1:3] == ["replica-a", "1"]
    assert "expired" in rows["3"] and rows["3"].split()[-1] == "replica-b"
    assert "never leased" in rows["4"]


async def test_without_state_url_it_says_so_in_one_line_and_exits_2() -> None:
    code, out, err = await cluster_status(state_url=None)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith("state.url: not set")


async def test_it_reads_only_and_an_empty_or_unreachable_database_is_one_line(
    postgres_url: str,
) -> None:
    code, _, err = await cluster_status(state_url=postgres_url)
    assert code == 1 and err.count("\n") == 1
    assert "no dispatchd tables yet" in err
    db = await asyncpg.connect(postgres_url)
    try:  # nothing was created
        assert await db.fetchval("SELECT to_regclass('schema_version')") is None
    finally:
        await db.close()
    code, _, err = await cluster_status(state_url="postgresql://someone:hidden-pw@127.0.0.1:1/none")
    assert code == 1 and err.count("\n") == 1
    assert "cannot connect" in err and "hidden-pw" not in err

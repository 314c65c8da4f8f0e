"""The SQLite store: schema version, migration of old files, crash safety, the headers text."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatchd.store import SchemaTooNew, SqliteStore, StoreError
from dispatchd.store.base import headers_text
from dispatchd.store.sqlite import SCHEMA_VERSION
from tests.shell.store_contract import envelope, everything

FIXTURE = Path(__file__).parent.parent / "fixtures" / "state-2026-11-30.sqlite3"


async def test_a_new_store_creates_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "state.sqlite3"
    store = SqliteStore(path)
    assert path.exists()
    assert store.location == str(path)
    await store.close()


def test_schema_version_is_recorded_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = SqliteStore(path)
    assert store.schema_version() == SCHEMA_VERSION
    store.close_now()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.close()
    with pytest.raises(StoreError, match="newer"):
        SqliteStore(path)


def test_both_sqlite_stores_refuse_a_newer_schema_with_one_error(tmp_path: Path) -> None:
    from dispatchd.localapi import storage

    daemon_path, api_path = tmp_path / "state.sqlite3", tmp_path / "api.sqlite3"
    SqliteStore(daemon_path).close_now()
    storage.Storage(api_path).close()
    for path in (daemon_path, api_path):
        with sqlite3.connect(path) as db:
            db.execute("UPDATE schema_version SET version = version + 1")
        db.close()
    with pytest.raises(SchemaTooNew) as from_daemon:
        SqliteStore(daemon_path)
    with pytest.raises(SchemaTooNew) as from_api:
        storage.Storage(api_path)
    assert isinstance(from_api.value, StoreError)  # the daemon reports both alike
    for raised, path, supported in (
        (from_daemon, daemon_path, SCHEMA_VERSION),
        (from_api, api_path, storage.SCHEMA_VERSION),
    ):
        assert str(raised.value) == (
            f"{path}: schema version {supported + 1} is newer than this dispatchd "
            f"understands ({supported})"
        )


def test_reopening_does_not_migrate_twice(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    SqliteStore(path).close_now()
    store = SqliteStore(path)
    assert store.schema_version() == SCHEMA_VERSION
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM schema_version").fetchone() == (1,)
    db.close()
    store.close_now()


WRITER = textwrap.dedent(
    """
    import asyncio
    import sys
    from pathlib import Path
    from dispatchd.core.wire import Envelope
    from dispatchd.store import SqliteStore

    async def main() -> None:
        store = SqliteStore(Path(sys.argv[1]))
        n = 0
        while True:
            envelopes = [
                Envelope(message_id=f"m{n}-{k}", routing_key="r", body=b"x" * 2000,
                         headers={"n": n}, type="dispatch.running", microgrid_id=1,
                         dispatch_id=n)
                for k in range(3)
            ]
            await store.commit(records={(1, n): str(n), (2, n): "y" * 5000},
                               meta={1: {"n": n}}, envelopes=envelopes)
            if n == 20:
                print("ready", flush=True)
            n += 1

    asyncio.run(main())
    """
)


def test_kill_9_mid_commit_leaves_the_last_complete_commit(tmp_path: Path) -> None:
    path = tmp_path / "crash.sqlite3"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=10)
    assert writer.returncode == -signal.SIGKILL

    store = SqliteStore(path)
    loaded = asyncio.run(everything(store))
    last = loaded.meta[1]["n"]
    assert last >= 20
    # Every commit up to the last one is complete, and nothing of a later one exists.
    assert set(loaded.records) == {(mg, n) for mg in (1, 2) for n in range(last + 1)}
    assert all(loaded.records[(1, n)] == str(n) for n in range(last + 1))
    assert [item.envelope.message_id for item in loaded.outbox] == [
        f"m{n}-{k}" for n in range(last + 1) for k in range(3)
    ]
    store.close_now()


async def test_a_version_1_file_keeps_its_one_meta_for_every_microgrid(tmp_path: Path) -> None:
    path = tmp_path / "dispatchd.sqlite3"
    shutil.copyfile(FIXTURE, path)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchone() == (1,)
        (old_meta,) = db.execute("SELECT data FROM meta WHERE id = 1").fetchone()
    db.close()
    store = SqliteStore(path)
    assert store.schema_version() == SCHEMA_VERSION
    stored = await store.microgrids()
    assert stored
    for microgrid_id in [*stored, 12345]:  # one not in the file gets the file's meta too
        assert (await store.load(microgrid_id)).meta == json.loads(old_meta)
    first = min(stored)
    await store.commit(meta={first: {"last_seen": None}})
    assert (await store.load(first)).meta == {"last_seen": None}
    assert (await store.load(12345)).meta == json.loads(old_meta)
    await store.close()


async def test_seqs_continue_after_rows_numbered_by_sqlite_itself(tmp_path: Path) -> None:
    """A database written by an older dispatchd (plain AUTOINCREMENT inserts)."""
    path = tmp_path / "dispatchd.sqlite3"
    SqliteStore(path).close_now()
    db = sqlite3.connect(path)
    with db:
        for n in range(3):
            db.execute(
                "INSERT INTO outbox (message_id, routing_key, type, microgrid_id, dispatch_id,"
                " headers, body) VALUES (?, 'k', 't', 7, 1, '{}', x'')",
                (f"old-{n}",),
            )
        db.execute("DELETE FROM outbox WHERE message_id = 'old-2'")
    db.close()

    store = SqliteStore(path)
    items = await store.commit(envelopes=[envelope(0), envelope(1)])
    assert [item.seq for item in items] == [4, 5]
    assert [item.envelope.message_id for item in await store.outbox()] == [
        "old-0",
        "old-1",
        items[0].envelope.message_id,
        items[1].envelope.message_id,
    ]
    await store.close()


@given(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=0, max_value=2**63 - 1),
    st.text(),
    st.sampled_from(["created", "updated", "deleted", "running", "stopped"]),
)
def test_outbox_headers_text_reads_back_as_the_headers(
    microgrid_id: int, dispatch_id: int, dispatch_type: str, event: str
) -> None:
    headers: dict[str, int | str] = {
        "microgrid_id": microgrid_id,
        "dispatch_id": dispatch_id,
        "dispatch_type": dispatch_type,
        "event": event,
        "schema": "dispatchd/v1",
    }
    for variant in (headers, {**headers, "extra": 1}, {**headers, "dispatch_id": "7"}):
        assert json.loads(headers_text(variant)) == variant

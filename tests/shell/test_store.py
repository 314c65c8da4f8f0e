"""The SQLite store: round trips, outbox order, schema version, crash safety."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatchd.core.wire import Envelope
from dispatchd.store import SCHEMA_VERSION, Store, StoreError, _headers_text


def envelope(n: int, *, microgrid_id: int = 7, dispatch_id: int = 1) -> Envelope:
    return Envelope(
        message_id=f"msg-{microgrid_id}-{dispatch_id}-{n}",
        routing_key=f"microgrid.{microgrid_id}.running.running.T{n}",
        body=f'{{"n": {n}, "bytes": "\u00e9"}}'.encode(),
        headers={"microgrid_id": microgrid_id, "dispatch_id": dispatch_id, "event": "running"},
        type="dispatch.running",
        microgrid_id=microgrid_id,
        dispatch_id=dispatch_id,
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state" / "dispatchd.sqlite3")


def test_new_store_is_empty_and_creates_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "state.sqlite3"
    store = Store(path)
    loaded = store.load()
    assert path.exists()
    assert (loaded.records, loaded.meta, loaded.outbox) == ({}, {}, [])
    assert store.outbox_size() == 0
    store.close()


def test_commit_round_trips_records_meta_and_envelopes(store: Store) -> None:
    envelopes = [envelope(1), envelope(2, dispatch_id=2)]
    items = store.commit(
        records={(7, 1): '{"a": 1}', (7, 2): '{"b": 2}', (8, 1): "x"},
        meta={"synced": {"7": True}, "version": 3},
        envelopes=envelopes,
    )
    assert [item.envelope for item in items] == envelopes
    assert items[0].seq < items[1].seq
    loaded = store.load()
    assert loaded.records == {(7, 1): '{"a": 1}', (7, 2): '{"b": 2}', (8, 1): "x"}
    assert loaded.meta == {"synced": {"7": True}, "version": 3}
    assert loaded.outbox == items
    assert store.outbox() == items


def test_records_upsert_and_delete(store: Store) -> None:
    store.commit(records={(7, 1): "one", (7, 2): "two"})
    store.commit(records={(7, 1): "one again", (7, 2): None, (7, 3): "three"})
    assert store.load().records == {(7, 1): "one again", (7, 3): "three"}
    store.commit(records={(7, 99): None})  # deleting an unknown record is a no-op
    assert store.load().records == {(7, 1): "one again", (7, 3): "three"}


def test_meta_is_replaced_only_when_given(store: Store) -> None:
    store.commit(meta={"a": 1})
    store.commit(records={(1, 1): "r"})
    assert store.load().meta == {"a": 1}
    store.commit(meta={"b": [1, 2]})
    assert store.load().meta == {"b": [1, 2]}


def test_outbox_keeps_commit_order_across_commits_and_removals(store: Store) -> None:
    first = store.commit(envelopes=[envelope(n) for n in range(3)])
    second = store.commit(envelopes=[envelope(n) for n in range(3, 6)])
    everything = first + second
    assert [item.seq for item in everything] == sorted(item.seq for item in everything)
    assert len({item.seq for item in everything}) == 6
    store.remove_from_outbox([first[1].seq, second[0].seq])
    assert store.outbox() == [first[0], first[2], second[1], second[2]]
    assert store.outbox_size() == 4
    store.remove_from_outbox([])
    assert store.outbox_size() == 4


def test_outbox_items_reads_back_the_given_seqs_that_are_still_there(store: Store) -> None:
    items = store.commit(envelopes=[envelope(n) for n in range(5)])
    store.remove_from_outbox([items[2].seq])
    wanted = [items[4].seq, items[0].seq, items[2].seq, items[3].seq]
    assert store.outbox_items(wanted) == [items[0], items[3], items[4]]
    assert store.outbox_items([]) == []


def test_seq_is_never_reused_after_the_newest_item_was_removed(store: Store) -> None:
    (item,) = store.commit(envelopes=[envelope(1)])
    store.remove_from_outbox([item.seq])
    (again,) = store.commit(envelopes=[envelope(2)])
    assert again.seq > item.seq


def test_a_failing_commit_changes_nothing(store: Store) -> None:
    store.commit(records={(7, 1): "kept"}, envelopes=[envelope(0)])

    class Broken:
        message_id = "x"
        routing_key = "k"
        type = "dispatch.running"
        microgrid_id = 7
        dispatch_id = 1
        headers = {"bad": object()}  # not JSON: fails after the record was written
        body = b""

    with pytest.raises(TypeError):
        store.commit(records={(7, 1): "changed", (7, 2): "new"}, envelopes=[Broken()])  # type: ignore[list-item]
    loaded = store.load()
    assert loaded.records == {(7, 1): "kept"}
    assert [item.envelope for item in loaded.outbox] == [envelope(0)]


def test_reopen_after_close_sees_everything(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = Store(path)
    items = store.commit(records={(7, 1): "r"}, meta={"m": 1}, envelopes=[envelope(1), envelope(2)])
    store.remove_from_outbox([items[0].seq])
    store.close()
    reopened = Store(path)
    loaded = reopened.load()
    assert loaded.records == {(7, 1): "r"}
    assert loaded.meta == {"m": 1}
    assert loaded.outbox == [items[1]]
    (later,) = reopened.commit(envelopes=[envelope(3)])
    assert later.seq > items[1].seq
    reopened.close()


def test_schema_version_is_recorded_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = Store(path)
    assert store.schema_version() == SCHEMA_VERSION
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.close()
    with pytest.raises(StoreError, match="newer"):
        Store(path)


def test_both_sqlite_stores_refuse_a_newer_schema_with_one_error(tmp_path: Path) -> None:
    from dispatchd.localapi import storage
    from dispatchd.store import SchemaTooNew

    daemon_path, api_path = tmp_path / "state.sqlite3", tmp_path / "api.sqlite3"
    Store(daemon_path).close()
    storage.Storage(api_path).close()
    for path in (daemon_path, api_path):
        with sqlite3.connect(path) as db:
            db.execute("UPDATE schema_version SET version = version + 1")
        db.close()
    with pytest.raises(SchemaTooNew) as from_daemon:
        Store(daemon_path)
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
    Store(path).close()
    store = Store(path)
    assert store.schema_version() == SCHEMA_VERSION
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM schema_version").fetchone() == (1,)
    db.close()
    store.close()


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from dispatchd.core.wire import Envelope
    from dispatchd.store import Store

    store = Store(Path(sys.argv[1]))
    n = 0
    while True:
        envelopes = [
            Envelope(message_id=f"m{n}-{k}", routing_key="r", body=b"x" * 2000,
                     headers={"n": n}, type="dispatch.running", microgrid_id=1, dispatch_id=n)
            for k in range(3)
        ]
        store.commit(records={(1, n): str(n), (2, n): "y" * 5000}, meta={"n": n},
                     envelopes=envelopes)
        if n == 20:
            print("ready", flush=True)
        n += 1
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

    store = Store(path)
    loaded = store.load()
    last = loaded.meta["n"]
    assert last >= 20
    # Every commit up to the last one is complete, and nothing of a later one exists.
    assert set(loaded.records) == {(mg, n) for mg in (1, 2) for n in range(last + 1)}
    assert all(loaded.records[(1, n)] == str(n) for n in range(last + 1))
    assert [item.envelope.message_id for item in loaded.outbox] == [
        f"m{n}-{k}" for n in range(last + 1) for k in range(3)
    ]
    assert [item.seq for item in loaded.outbox] == sorted(item.seq for item in loaded.outbox)
    store.close()


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
        assert json.loads(_headers_text(variant)) == variant

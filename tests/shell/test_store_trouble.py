"""The state store on a bad day: a WAL kept small, a full or read-only volume, a
file that is not a state database. Each error names the file and what to do."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from dispatchd.core.wire import Envelope
from dispatchd.store import SqliteStore, StateDirError, StoreError, StoreWriteError
from dispatchd.store.sqlite import CHECKPOINT_PAGES, WAL_LIMIT


def envelope(n: int, size: int = 100) -> Envelope:
    return Envelope(
        message_id=f"m{n}",
        routing_key="k",
        body=b"x" * size,
        headers={"n": n},
        type="t",
        microgrid_id=1,
        dispatch_id=n,
    )


async def test_the_wal_is_truncated_after_a_commit_that_grew_it_past_the_limit(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "state.sqlite3")
    try:
        records = {(1, n): "r" * 2000 for n in range(5000)}  # about 10 MB in one transaction
        await store.commit(records=records)
        assert store.wal_size() <= WAL_LIMIT
        for n in range(200):  # and it stays bounded under a steady stream of small commits
            await store.commit(records={(2, n): "s" * 5000}, envelopes=[envelope(n)])
            assert store.wal_size() <= WAL_LIMIT
    finally:
        await store.close()


async def test_commits_leave_the_checkpoint_to_the_removal_of_confirmed_messages(
    tmp_path: Path,
) -> None:
    """A burst's commits are not slowed by a checkpoint; removing its confirmed messages,
    off the event loop, copies the WAL into the database file."""
    path = tmp_path / "state.sqlite3"
    store = SqliteStore(path)
    try:
        await store.commit(records={(1, 0): "first"})
        size_before = path.stat().st_size
        seqs = []
        threshold = CHECKPOINT_PAGES * 4096
        for n in range(150):  # until the WAL holds twice what a removal checkpoints
            items = await store.commit(
                records={(1, n): "r" * 10_000}, envelopes=[envelope(n, size=10_000)]
            )
            seqs += [item.seq for item in items]
            if store.wal_size() >= 2 * threshold:
                break
        assert 2 * threshold <= store.wal_size() < WAL_LIMIT
        assert path.stat().st_size == size_before  # every page still only in the WAL
        await store.remove_from_outbox(seqs[:1])
        assert path.stat().st_size > size_before + threshold
        # And further commits still leave it to the next removal.
        size_after = path.stat().st_size
        for m in range(n + 1, n + 61):
            await store.commit(records={(1, m): "r" * 10_000})
        assert path.stat().st_size == size_after
        assert (await store.load(1)).records[(1, 5)] == "r" * 10_000
    finally:
        await store.close()


async def test_a_full_database_raises_a_one_line_error_naming_the_file(tmp_path: Path) -> None:
    """``max_page_count`` gives SQLite's genuine SQLITE_FULL without a full volume."""
    path = tmp_path / "state.sqlite3"
    store = SqliteStore(path)
    try:
        await store.commit(envelopes=[envelope(0)])
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count={pages}")
        with pytest.raises(StoreWriteError) as raised:
            await store.commit(records={(1, n): "r" * 4000 for n in range(50)})
        assert str(raised.value) == f"state store {path}: disk full"
        # A confirmed message whose delete cannot be written is hidden, not re-sent.
        await store.remove_from_outbox([1])
        assert await store.outbox() == []
        store._db.execute(f"PRAGMA max_page_count={pages * 1000}")
        await store.commit(records={(1, 1): "ok"})
        assert await store.outbox() == []
    finally:
        await store.close()
    reopened = SqliteStore(path)
    try:
        assert (await reopened.load(1)).outbox == []
        assert (await reopened.load(1)).records == {(1, 1): "ok"}
    finally:
        await reopened.close()


async def test_a_read_only_database_says_read_only(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    SqliteStore(path).close_now()
    store = SqliteStore(path)
    try:
        store._db.execute("PRAGMA query_only=1")
        with pytest.raises(StoreWriteError, match=r"^state store .*state\.sqlite3: read-only$"):
            await store.commit(records={(1, 1): "x"})
    finally:
        await store.close()


def test_a_file_that_is_not_a_database_is_named_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    path.write_bytes(b"this is not an SQLite database, just some bytes " * 100)
    with pytest.raises(StoreError) as raised:
        SqliteStore(path)
    message = str(raised.value)
    assert message.startswith(f"state store {path}: not a usable dispatchd state file")
    assert "move it aside" in message
    assert raised.value.exit_code == 1


def test_a_state_dir_that_is_a_file_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "var").write_text("not a directory")
    with pytest.raises(StateDirError) as raised:
        SqliteStore(tmp_path / "var" / "state.sqlite3")
    assert str(raised.value).startswith(f"state.dir {tmp_path / 'var'}: cannot be used")
    assert raised.value.exit_code == 2


def _run(state_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DISPATCHD_STATE__DIR": str(state_dir),
        "DISPATCHD_HTTP__LISTEN": "127.0.0.1:0",
        "DISPATCHD_API__LOCAL__LISTEN": "127.0.0.1:0",
        "DISPATCHD_LOG__FORMAT": "json",
    }
    return subprocess.run(
        [sys.executable, "-m", "dispatchd", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _the_line_naming_the_state_file(result: subprocess.CompletedProcess[str]) -> str:
    """The run exited 1 without a traceback; its one stderr line that names the file."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "dispatchd.sqlite3" in line]
    return line


def test_run_on_a_corrupt_state_file_exits_1_with_one_line_naming_it(tmp_path: Path) -> None:
    state = tmp_path / "var"
    state.mkdir()
    (state / "dispatchd.sqlite3").write_bytes(b"garbage" * 1000)
    line = _the_line_naming_the_state_file(_run(state))
    assert "not a usable dispatchd state file" in line
    assert "move it aside" in line


def _damaged_after_open(path: Path) -> None:
    """A valid state file whose records table's leaf pages are then overwritten: it
    opens (the schema on page 1 is intact), but reading or writing records fails
    with SQLite's 'database disk image is malformed'."""

    async def fill() -> None:
        store = SqliteStore(path)
        try:
            await store.commit(records={(1, n): "r" * 500 for n in range(400)})
        finally:
            await store.close()

    asyncio.run(fill())
    with contextlib.closing(sqlite3.connect(path)) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        last_table = db.execute("SELECT max(rootpage) FROM sqlite_master").fetchone()[0]
    data = bytearray(path.read_bytes())
    start = last_table * page_size  # the pages after every table's root: records' leaves
    assert len(data) > start + page_size
    data[start:] = b"\xff" * (len(data) - start)
    path.write_bytes(bytes(data))


async def test_a_file_damaged_after_it_was_opened_names_it_on_read_and_commit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.sqlite3"
    await asyncio.to_thread(_damaged_after_open, path)
    store = SqliteStore(path)  # opens: the damage is only found by reading
    try:
        for reading in (store.microgrids(), store.load(1)):
            with pytest.raises(StoreError) as raised:
                await reading
            assert str(raised.value).startswith(
                f"state store {path}: not a usable dispatchd state file "
                "(database disk image is malformed); stop dispatchd, move it aside"
            )
        with pytest.raises(StoreWriteError) as written:
            await store.commit(records={(1, n): "s" for n in range(400)})
        assert str(written.value).startswith(
            f"state store {path}: not a usable dispatchd state file"
        )
        assert "move it aside" in str(written.value)
    finally:
        await store.close()


def test_run_on_a_state_file_damaged_inside_exits_1_with_one_line_naming_it(
    tmp_path: Path,
) -> None:
    """Open succeeds, the first read fails: the same line and exit code as a file
    that does not open at all, no traceback."""
    state = tmp_path / "var"
    state.mkdir()
    _damaged_after_open(state / "dispatchd.sqlite3")
    line = _the_line_naming_the_state_file(_run(state))
    assert "not a usable dispatchd state file (database disk image is malformed)" in line
    assert "move it aside" in line


def test_run_with_a_state_dir_that_is_a_file_exits_2(tmp_path: Path) -> None:
    """The start-up checks (the same as check-config's) catch it before the store is opened."""
    (tmp_path / "var").write_text("oops")
    result = _run(tmp_path / "var")
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"state.dir: {tmp_path / 'var'} exists and is not a directory\n"

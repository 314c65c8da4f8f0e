"""Batched commits: one executemany per table, outbox seqs handed out like AUTOINCREMENT."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from dispatchd.store import Store
from tests.shell.test_store import envelope


def test_batch_seqs_are_the_stored_ones_and_continue_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "dispatchd.sqlite3"
    store = Store(path)
    first = store.commit(envelopes=[envelope(n) for n in range(500)])
    assert store.outbox() == first
    assert [item.seq for item in first] == list(range(first[0].seq, first[0].seq + 500))
    store.remove_from_outbox(item.seq for item in first)
    store.close()

    reopened = Store(path)
    (after,) = reopened.commit(envelopes=[envelope(500)])
    assert after.seq == first[-1].seq + 1
    assert reopened.outbox() == [after]
    reopened.close()


def test_seqs_continue_after_rows_numbered_by_sqlite_itself(tmp_path: Path) -> None:
    """A database written by an older dispatchd (plain AUTOINCREMENT inserts)."""
    path = tmp_path / "dispatchd.sqlite3"
    Store(path).close()
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

    store = Store(path)
    items = store.commit(envelopes=[envelope(0), envelope(1)])
    assert [item.seq for item in items] == [4, 5]
    assert [item.envelope.message_id for item in store.outbox()] == [
        "old-0",
        "old-1",
        items[0].envelope.message_id,
        items[1].envelope.message_id,
    ]
    store.close()


def test_one_commit_upserts_and_deletes_many_records(tmp_path: Path) -> None:
    store = Store(tmp_path / "dispatchd.sqlite3")
    store.commit(records={(7, n): f"v{n}" for n in range(100)})
    changes: dict[tuple[int, int], str | None] = {(7, n): None for n in range(0, 100, 2)}
    changes |= {(7, n): f"w{n}" for n in range(1, 100, 2)} | {(8, 1): "new"}
    assert store.commit(records=changes) == []
    expected = {(7, n): f"w{n}" for n in range(1, 100, 2)} | {(8, 1): "new"}
    assert store.load().records == expected
    store.close()

"""A state file written by an earlier dispatchd still loads, converges and is written anew.

The fixture was saved by dispatchd before the stored record had one module
and one time format: its records mix ``+00:00`` (the record's own times)
and ``Z`` (the dispatch inside). ``state_file_history`` is what it holds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dispatchd.core.engine import Engine
from dispatchd.core.records import DispatchRecord, record_to_text
from dispatchd.loop import restore_engine
from dispatchd.store import Store
from tests.core.engine_helpers import at, run_until
from tests.shell.state_file_history import LISTED, MG, WRITTEN_AT, replay

FIXTURE = Path(__file__).parent.parent / "fixtures" / "state-2026-11-30.sqlite3"


def _restored(tmp_path: Path) -> Engine:
    path = tmp_path / "dispatchd.sqlite3"
    shutil.copyfile(FIXTURE, path)
    store = Store(path)
    try:
        assert "+00:00" in "".join(store.load().records.values())  # the old format indeed
        return restore_engine(store)
    finally:
        store.close()


def _by_key(records: list[DispatchRecord]) -> list[DispatchRecord]:
    return sorted(records, key=lambda record: (record.dispatch.microgrid_id, record.dispatch.id))


def test_the_old_state_file_restores_what_was_saved(tmp_path: Path) -> None:
    restored = _restored(tmp_path)
    kept = Engine()
    replay(kept, lambda _: None)
    restored_records, restored_meta = restored.export()
    kept_records, kept_meta = kept.export()
    assert _by_key(restored_records) == _by_key(kept_records)
    assert restored_meta == kept_meta
    assert restored.snapshot(MG) == kept.snapshot(MG)


def test_the_old_state_file_converges_with_nothing_to_announce(tmp_path: Path) -> None:
    restored = _restored(tmp_path)
    restored.hold(at(WRITTEN_AT))
    listed = restored.relist(MG, LISTED, at(WRITTEN_AT), initial=True)
    assert listed.messages == []
    kept = Engine()
    replay(kept, lambda _: None)
    # From here on both announce the same, at the same instants.
    assert run_until(restored, 6000) == run_until(kept, 6000)


def test_the_restored_records_are_written_with_one_time_format(tmp_path: Path) -> None:
    records, _ = _restored(tmp_path).export()
    texts = [record_to_text(record) for record in records]
    assert texts and not any("+00:00" in text for text in texts)
    assert all('"2026-01-01T' in text for text in texts)

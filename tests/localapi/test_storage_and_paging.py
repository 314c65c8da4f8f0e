"""Page tokens and the schema version guard."""

from __future__ import annotations

import pathlib
import sqlite3

import pytest
from frequenz.api.dispatch.v1.dispatch_pb2 import DispatchFilter, SortOptions
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatchd.localapi import paging
from dispatchd.localapi.storage import SCHEMA_VERSION, Storage
from dispatchd.localapi.validation import InvalidRequest
from dispatchd.store import SchemaTooNew

MARK = paging.fingerprint(1, DispatchFilter(), SortOptions())


@settings(max_examples=200, deadline=None)
@given(
    key=st.integers(-(2**62), 2**62),
    last_id=st.integers(1, 2**62),
    size=st.integers(1, paging.MAX_PAGE_SIZE),
)
def test_tokens_round_trip(key: int, last_id: int, size: int) -> None:
    token = paging.PageToken(key, last_id, size, MARK)
    assert paging.decode(paging.encode(token), MARK) == token


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=80) | st.binary(max_size=60).map(lambda b: b.hex()))
def test_garbage_tokens_are_invalid_requests(text: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        paging.decode(text, MARK)
    assert error.value.field == "pagination_params.page_token"


def test_fingerprint_depends_on_filter_sort_and_microgrid() -> None:
    marks = {
        MARK,
        paging.fingerprint(2, DispatchFilter(), SortOptions()),
        paging.fingerprint(1, DispatchFilter(is_active=True), SortOptions()),
        paging.fingerprint(1, DispatchFilter(), SortOptions(sort_field=1)),  # type: ignore[arg-type]
    }
    assert len(marks) == 4


def test_page_size_defaults_and_cap() -> None:
    assert paging.page_size_of(0) == paging.DEFAULT_PAGE_SIZE
    assert paging.page_size_of(5) == 5
    assert paging.page_size_of(10**9) == paging.MAX_PAGE_SIZE


def test_schema_is_versioned_and_newer_databases_are_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "db.sqlite3"
    Storage(path).close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT MAX(version) FROM schema_version").fetchone() == (SCHEMA_VERSION,)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
        db.commit()
    finally:
        db.close()
    with pytest.raises(SchemaTooNew):
        Storage(path)

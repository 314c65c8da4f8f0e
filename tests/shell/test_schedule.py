"""``dispatchd schedule``: the microgrid must be one the daemon syncs; rows are limited."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.recurrence import Frequency, RecurrenceRule
from frequenz.client.dispatch.types import TargetIds

from dispatchd import schedule
from dispatchd.config import load_config
from dispatchd.core.model import Dispatch, Recurrence
from dispatchd.localapi import LocalApiServer

START = datetime(2026, 5, 1, tzinfo=UTC)


def minutely(dispatch_id: int, offset_seconds: int) -> Dispatch:
    return Dispatch(
        id=dispatch_id,
        microgrid_id=1,
        type=f"T{dispatch_id}",
        start_time=START + timedelta(seconds=offset_seconds),
        duration=timedelta(seconds=30),
        target=TargetIds(1),
        recurrence=Recurrence(frequency=Frequency.MINUTELY),
        create_time=START,
        update_time=START,
    )


def test_an_unknown_microgrid_is_a_usage_error_before_any_call(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Nothing listens on port 1: asking the API would fail with exit 1 instead.
    settings = load_config(
        None, {"DISPATCHD_API__LOCAL__LISTEN": "127.0.0.1:1", "DISPATCHD_API__CALL_TIMEOUT": "5"}
    )
    code = schedule.main(
        settings,
        microgrid_id=9,
        start=START,
        end=START + timedelta(days=1),
        dispatch_type=None,
        limit=10,
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("dispatchd schedule: microgrid 9 is not one the daemon syncs")
    assert "microgrid_ids: 1" in err


def test_rows_are_merged_in_order_and_cut_at_the_limit_saying_so() -> None:
    out, err = io.StringIO(), io.StringIO()
    end = START + timedelta(days=365)  # 525600 occurrences each: only the first few are built
    cut = schedule.print_schedule([minutely(2, 10), minutely(1, 20)], START, end, out, err, limit=5)
    rows = out.getvalue().splitlines()[1:]
    assert cut and len(rows) == 5
    assert [row.split()[2] for row in rows] == ["2", "1", "2", "1", "2"]
    assert rows[0].startswith("2026-05-01T00:00:10")
    assert err.getvalue().startswith("# cut after 5 occurrences (at 2026-05-01T00:02:20")
    assert "--limit" in err.getvalue()


def test_no_cut_message_when_everything_fits() -> None:
    out, err = io.StringIO(), io.StringIO()
    end = START + timedelta(minutes=3)
    assert not schedule.print_schedule([minutely(1, 0)], START, end, out, err, limit=3)
    assert len(out.getvalue().splitlines()) == 4 and err.getvalue() == ""


@pytest.fixture
async def local_api(tmp_path: Path) -> AsyncIterator[int]:
    server = LocalApiServer(listen="127.0.0.1:0", database=tmp_path / "api.sqlite3")
    port = await server.start()
    yield port
    await server.stop(0)


async def test_the_command_prints_at_most_limit_rows(local_api: int, tmp_path: Path) -> None:
    client = DispatchApiClient(server_url=f"grpc://127.0.0.1:{local_api}?ssl=false", auth_key="k")
    start = datetime.now(UTC) + timedelta(hours=1)
    await client.create(
        MicrogridId(1),
        "EVERY_MINUTE",
        start,
        timedelta(seconds=20),
        TargetIds(1),
        recurrence=RecurrenceRule(frequency=Frequency.MINUTELY),
    )
    await client.disconnect()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DISPATCHD_")},
        "DISPATCHD_API__LOCAL__LISTEN": f"127.0.0.1:{local_api}",
        "DISPATCHD_STATE__DIR": str(tmp_path),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatchd",
        "schedule",
        "--microgrid",
        "1",
        "--to",
        (start + timedelta(days=30)).isoformat(),
        "--limit",
        "7",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode == 0, err
    rows = out.decode().splitlines()[1:]
    assert len(rows) == 7 and all(row.endswith("EVERY_MINUTE") for row in rows)
    assert err.decode().startswith("# cut after 7 occurrences")

"""The status page and its JSON against a running daemon, dispatches made through the local API;
the page itself in headless Chromium."""

from __future__ import annotations

import asyncio
import html.parser
import itertools
import json
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from frequenz.client.dispatch.recurrence import Frequency, RecurrenceRule
from frequenz.client.dispatch.types import TargetIds

from dispatchd import status
from dispatchd.core import wire
from tests.shell.daemon_harness import MG, DaemonHandle, http_get, mg, running_daemon

WAIT = 15.0
REPO = Path(__file__).resolve().parents[2]


async def get_json(handle: DaemonHandle, path: str) -> tuple[int, Any]:
    code, body = await handle.http_get(path)
    return code, json.loads(body)


async def schedule(handle: DaemonHandle, **params: object) -> tuple[int, Any]:
    return await get_json(handle, "/api/v1/schedule?" + urlencode(params))


async def create_dispatches(handle: DaemonHandle) -> dict[str, int]:
    """Running, scheduled, recurring and inactive; returns their ids by name.

    (The local API refuses a dispatch the scheduler finds invalid, so invalid
    rows are covered by tests/shell/test_status_document.py.)
    """
    client = handle.client
    now = datetime.now(UTC)
    made = {
        "running": await client.create(
            mg(), "BATTERY_PEAK", "NOW", timedelta(hours=1), TargetIds(11, 12)
        ),
        "later": await client.create(
            mg(), "EV_CHARGING", now + timedelta(hours=3), timedelta(minutes=90), TargetIds(21)
        ),
        "hourly": await client.create(
            mg(),
            "PV_CURTAIL",
            now + timedelta(minutes=20),
            timedelta(minutes=15),
            TargetIds(31),
            recurrence=RecurrenceRule(frequency=Frequency.HOURLY, interval=4),
        ),
        "inactive": await client.create(
            mg(),
            "EV_CHARGING",
            now + timedelta(hours=5),
            timedelta(hours=2),
            TargetIds(22),
            active=False,
        ),
    }
    ids = {name: int(dispatch.id) for name, dispatch in made.items()}
    # The daemon has them all, and has announced the running one.
    await until_schedule(
        handle,
        lambda doc: (
            {row["id"] for row in doc["dispatches"]} >= set(ids.values())
            and any(row["running"] for row in doc["dispatches"] if row["id"] == ids["running"])
        ),
    )
    return ids


async def until_schedule(handle: DaemonHandle, predicate: Callable[[Any], bool]) -> Any:
    async with asyncio.timeout(WAIT):
        while True:
            code, doc = await schedule(handle, microgrid_id=MG)
            assert code == 200, doc
            if predicate(doc):
                return doc
            await asyncio.sleep(0.05)


async def test_schedule_and_status_json(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    async with running_daemon(tmp_path, amqp_url, unique_name("status")) as handle:
        ids = await create_dispatches(handle)
        code, doc = await schedule(handle, microgrid_id=MG)
        assert code == 200
        now = wire.parse_time(doc["now"])
        start, end = wire.parse_time(doc["from"]), wire.parse_time(doc["to"])
        assert (now - start, end - now) == (timedelta(hours=2), timedelta(hours=24))
        rows = {row["id"]: row for row in doc["dispatches"]}
        states = {name: rows[dispatch_id]["state"] for name, dispatch_id in ids.items()}
        assert states == {
            "running": "running",
            "later": "scheduled",
            "hourly": "scheduled",
            "inactive": "inactive",
        }
        running = rows[ids["running"]]
        assert running["running"] is True
        assert running["type"] == "BATTERY_PEAK"
        assert running["target"] == {"component_ids": [11, 12]}
        assert len(running["occurrences"]) == 1
        # Every 4 hours over the 24 h ahead: 6 occurrences, 15 minutes each.
        hourly = rows[ids["hourly"]]["occurrences"]
        assert len(hourly) == 6
        first = wire.parse_time(hourly[0]["start"])
        assert wire.parse_time(hourly[0]["end"]) - first == timedelta(minutes=15)
        # The same computation as ``dispatchd schedule``.
        assert [id_ for id_ in rows] == sorted(rows)
        # Type filter and an explicit window.
        code, doc = await schedule(
            handle,
            microgrid_id=MG,
            type="EV_CHARGING",
            **{"from": wire.format_time(now), "to": wire.format_time(now + timedelta(hours=4))},
        )
        assert code == 200
        assert {row["id"]: len(row["occurrences"]) for row in doc["dispatches"]} == {
            ids["later"]: 1,
            ids["inactive"]: 0,
        }

        code, health = await get_json(handle, "/api/v1/status")
        assert code == 200
        assert health["ready"] is True and health["missing"] == []
        assert health["broker"]["connected"] is True
        assert health["outbox"]["depth"] >= 0
        (microgrid,) = health["microgrids"]
        assert microgrid["microgrid_id"] == MG
        assert microgrid["stream_up"] is True
        assert microgrid["first_sync"] is not None
        assert microgrid["dispatches"]["running"] == 1
        assert microgrid["dispatches"]["inactive"] == 1
        recent = health["recent_messages"]
        started = next(m for m in recent if m["dispatch_id"] == ids["running"] and m["reason"])
        assert (started["kind"], started["event"]) == ("running", "running")
        assert isinstance(started["lateness"], float)
        assert {"kind": "lifecycle", "event": "created"}.items() <= recent[-1].items()


async def test_schedule_requests_are_bounded_with_a_clear_400(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    async with running_daemon(tmp_path, amqp_url, unique_name("status")) as handle:
        now = datetime.now(UTC)
        two_years = {"from": wire.format_time(now), "to": wire.format_time(now + timedelta(730))}
        code, doc = await schedule(handle, microgrid_id=MG, **two_years)
        assert code == 400
        assert "at most 31 days" in doc["error"]
        assert (await schedule(handle, microgrid_id="seven"))[0] == 400
        assert (await schedule(handle))[0] == 400
        code, doc = await schedule(handle, microgrid_id=MG + 1)
        assert code == 404 and f"microgrid {MG + 1} is not synced here" in doc["error"]
        assert (await schedule(handle, microgrid_id=MG, **{"from": "yesterday"}))[0] == 400
        backwards = {"from": wire.format_time(now), "to": wire.format_time(now - timedelta(1))}
        assert (await schedule(handle, microgrid_id=MG, **backwards))[0] == 400
        # A minutely rule over 30 days is 43,200 occurrences: more than one answer holds.
        await handle.client.create(
            mg(),
            "MINUTELY",
            now + timedelta(minutes=5),
            timedelta(seconds=10),
            TargetIds(1),
            recurrence=RecurrenceRule(frequency=Frequency.MINUTELY),
        )
        month = {"from": wire.format_time(now), "to": wire.format_time(now + timedelta(30))}
        await until_schedule(
            handle, lambda doc: any(row["type"] == "MINUTELY" for row in doc["dispatches"])
        )
        code, doc = await schedule(handle, microgrid_id=MG, **month)
        assert code == 400
        assert f"more than {status.MAX_OCCURRENCES} occurrences" in doc["error"]
        code, doc = await schedule(handle, microgrid_id=MG)  # the default day is fine
        assert code == 200
        starts = [wire.parse_time(o["start"]) for o in doc["dispatches"][0]["occurrences"]]
        assert {b - a for a, b in itertools.pairwise(starts)} == {timedelta(minutes=1)}
        assert starts[-1] < wire.parse_time(doc["to"]) <= starts[-1] + timedelta(minutes=1)


# ------------------------------------------------------------------- browser


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed (.ci/run installs the Debian package)")
    return found


async def run_chromium(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        chromium(),
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--virtual-time-budget=10000",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(90):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


class Rows(html.parser.HTMLParser):
    """The timeline rows of a dumped DOM: dispatch id -> (classes, text of its label)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, set[str]] = {}
        self.now_lines = 0
        self.loaded = False
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        classes = set((attributes.get("class") or "").split())
        if tag == "body" and attributes.get("data-loaded") == "true":
            self.loaded = True
        if "row" in classes and attributes.get("data-dispatch-id"):
            self.rows[int(attributes["data-dispatch-id"] or 0)] = classes
        if "now" in classes:
            self.now_lines += 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.mark.timeout(300)  # two browser starts on a loaded machine
async def test_the_status_page_in_a_real_browser(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    async with running_daemon(tmp_path / "state", amqp_url, unique_name("status")) as handle:
        ids = await create_dispatches(handle)
        url = f"http://127.0.0.1:{handle.http_port}/"
        dom = await run_chromium("--dump-dom", url)
        screenshot = tmp_path / "status.png"
        await run_chromium(f"--screenshot={screenshot}", "--window-size=1400,1000", url)
        # The page is still served while the browser is gone (no stuck connections).
        assert (await http_get(handle.http_port, "/livez"))[0] == 200
    page = Rows()
    page.feed(dom)
    assert page.loaded, dom[-2000:]
    assert set(ids.values()) <= set(page.rows)
    assert "running" in page.rows[ids["running"]]
    assert {"inactive"} <= page.rows[ids["inactive"]]
    assert all("running" not in page.rows[ids[name]] for name in ("later", "hourly", "inactive"))
    assert page.now_lines == 1
    text = " ".join(page.text)
    assert "BATTERY_PEAK" in text and "components 11,12" in text
    assert "running.running" in text  # the last messages
    assert screenshot.stat().st_size > 10_000
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

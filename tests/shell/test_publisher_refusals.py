"""A broker that refuses dispatchd for a reason retrying cannot fix, with real connections.

Each case must give one ERROR line naming the cause and the fix, the same text
in ``last_error`` (what ``/readyz`` shows), the slow retry instead of the fast
backoff, and never the password.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatchd.logs import configure_logging, reset_logging
from dispatchd.publisher import REFUSED_RETRY, Publisher
from dispatchd.store import SqliteStore
from tests.shell.daemon_harness import running_daemon

PASSWORD = "Wr0ng-pw-9xQz"
"""Never to be seen in a log line, ``last_error`` or ``/readyz``."""


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    out = io.StringIO()
    configure_logging("DEBUG", "json", stream=out)
    yield out
    reset_logging()


def parsed(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


async def refused(
    tmp_path: Path, out: io.StringIO, amqp_url: str, exchange: str = ""
) -> tuple[Publisher, dict[str, Any]]:
    """Start a publisher that the broker refuses; its state and its one ERROR line."""
    publisher = Publisher(
        amqp_url=amqp_url,
        exchange=exchange or f"test-refused-{uuid.uuid4().hex[:12]}",
        store=SqliteStore(tmp_path / "state.sqlite3"),
        reconnect_interval=0.05,
    )
    await publisher.start()  # returns: it keeps trying in the background
    try:
        assert not publisher.connected
        assert publisher.retry_in == REFUSED_RETRY  # the slow retry, not the 0.05 s backoff
        lines = parsed(out)
        errors = [line for line in lines if line["level"] == "error"]
        ours = [line for line in errors if line.get("logger") == "dispatchd.publisher"]
        assert len(ours) == 1, errors
        assert ours[0]["retry_in_seconds"] == REFUSED_RETRY
        assert ours[0]["error"] in (publisher.last_error or "")
        assert not [line for line in lines if line["event"] == "broker unreachable, retrying"]
        assert PASSWORD not in out.getvalue()
        assert PASSWORD not in (publisher.last_error or "")
        return publisher, ours[0]
    finally:
        await publisher.close(1)


async def test_a_wrong_password_says_access_refused_and_what_to_fix(
    tmp_path: Path, log_lines: io.StringIO
) -> None:
    _, line = await refused(tmp_path, log_lines, f"amqp://guest:{PASSWORD}@127.0.0.1:5672/")
    assert "ACCESS_REFUSED" in line["error"]
    assert "user 'guest' at 127.0.0.1:5672" in line["error"]
    assert "password in amqp.url" in line["error"]


async def test_tls_against_the_plain_port_says_to_use_amqp(
    tmp_path: Path, log_lines: io.StringIO
) -> None:
    _, line = await refused(tmp_path, log_lines, f"amqps://guest:{PASSWORD}@127.0.0.1:5672/")
    assert "WRONG_VERSION_NUMBER" in line["error"]
    assert "does not speak TLS" in line["error"]
    assert "use amqp:// instead of amqps://" in line["error"]


async def test_an_amq_exchange_name_says_it_is_reserved(
    tmp_path: Path, log_lines: io.StringIO
) -> None:
    exchange = f"amq.dispatch-{uuid.uuid4().hex[:12]}"
    _, line = await refused(tmp_path, log_lines, "amqp://guest:guest@127.0.0.1:5672/", exchange)
    assert exchange in line["error"]
    assert "reserved" in line["error"]
    assert "set amqp.exchange to another name" in line["error"]


async def test_readyz_names_the_refusal(amqp_url: str, tmp_path: Path) -> None:
    bad_url = amqp_url.replace("guest:guest@", f"guest:{PASSWORD}@", 1)
    assert bad_url != amqp_url
    async with running_daemon(
        tmp_path, bad_url, f"test-refused-{uuid.uuid4().hex[:12]}", wait_ready=False
    ) as handle:
        status, body = await handle.http_get("/readyz")
        assert handle.daemon.publisher is not None
        assert handle.daemon.publisher.retry_in == REFUSED_RETRY
    assert status == 503
    missing = " ".join(json.loads(body)["missing"])
    assert "ACCESS_REFUSED" in missing
    assert "amqp.url" in missing
    assert "retrying every 60 s" in missing
    assert PASSWORD not in body.decode()

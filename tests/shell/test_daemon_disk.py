"""``dispatchd run`` on a full state volume: it stays up, says so, and catches up.

The volume is a real size-limited tmpfs mounted for the test (CI runs as root;
elsewhere the test is skipped, and ``tests/shell/test_store_trouble.py`` covers
the store's side with SQLite's ``max_page_count``, which raises the same
SQLITE_FULL).
"""

from __future__ import annotations

import errno
import json
import subprocess
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import structlog
from frequenz.client.dispatch.types import TargetIds

from dispatchd.daemon import STATE_FILE
from dispatchd.localapi.server import LocalApiServer
from tests.shell.daemon_harness import (
    QueueObserver,
    api_client,
    http_get,
    metric,
    mg,
    poll,
    running_daemon,
    soon,
)

WAIT = 15.0


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs: room for the state, and quickly filled by the test."""
    mount = tmp_path / "volume"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(volume: Path) -> Path:
    """Write a file until the volume is full; returns it (delete it to free the space)."""
    filler = volume / "filler"
    chunk = b"\0" * 65536
    # Unbuffered: a partial write leaves nothing behind for close() to fail on.
    with filler.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(chunk)
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


async def readyz(port: int) -> tuple[int, list[str]]:
    status, body = await http_get(port, "/readyz")
    return status, list(json.loads(body).get("missing", []))


async def test_full_state_volume_keeps_running_says_so_and_catches_up(
    amqp_url: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    small_volume: Path,
) -> None:
    exchange = unique_name("e2e")
    server = LocalApiServer(listen="127.0.0.1:0", database=tmp_path / "api.sqlite3")
    port = await server.start()
    url = f"grpc://127.0.0.1:{port}?ssl=false"
    direct = api_client(url)
    state = small_volume / "state"
    path = state / STATE_FILE
    created: list[int] = []
    try:
        with structlog.testing.capture_logs() as logs:
            async with (
                QueueObserver(amqp_url, exchange) as observer,
                running_daemon(state, amqp_url, exchange, api_url=url) as handle,
            ):
                before = await direct.create(mg(), "BEFORE", soon(600), None, TargetIds(1))
                await observer.seen(lambda r: r.is_(int(before.id), "created"), WAIT)
                filler = fill(small_volume)
                # Dispatches with a big payload until a commit needs space the volume lacks.
                for n in range(400):
                    dispatch = await direct.create(
                        mg(),
                        "DURING",
                        soon(3),
                        timedelta(seconds=1),
                        TargetIds(1),
                        payload={"n": n, "pad": "x" * 40_000},
                    )
                    created.append(int(dispatch.id))
                    status, missing = await readyz(handle.http_port)
                    if f"state store {path}: disk full" in missing:
                        break
                assert status == 503
                assert f"state store {path}: disk full" in missing
                assert not handle.task.done()
                assert metric("dispatchd_broker_up") == 1
                filler.unlink()
                for dispatch_id in created:  # late, not lost: the transitions due meanwhile too
                    await observer.seen(lambda r, d=dispatch_id: r.is_(d, "created"), WAIT)
                    await observer.seen(lambda r, d=dispatch_id: r.is_(d, "stopped"), WAIT)
                loop = handle.daemon.loop
                assert loop is not None
                await poll(lambda: loop.store_problem is None, WAIT)
                status, missing = await readyz(handle.http_port)
                assert (status, missing) == (200, [])
                after = await direct.create(mg(), "AFTER", soon(600), None, TargetIds(1))
                await observer.seen(lambda r: r.is_(int(after.id), "created"), WAIT)
    finally:
        await direct.disconnect()
        await server.stop(0)
    errors = [entry for entry in logs if entry["log_level"] == "error"]
    assert len(errors) == 1, errors  # one a minute; the test takes seconds
    assert errors[0]["error"] == f"state store {path}: disk full"
    ids = [r.message_id for r in observer.received]
    assert len(ids) == len(set(ids))


async def test_stopped_while_the_volume_is_full_stops_promptly_and_catches_up_at_restart(
    amqp_url: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    small_volume: Path,
) -> None:
    """What was held in memory is not written at the stop (no space), and the stop does
    not spend its budget retrying; the next start re-lists and announces it."""
    exchange = unique_name("e2e")
    server = LocalApiServer(listen="127.0.0.1:0", database=tmp_path / "api.sqlite3")
    port = await server.start()
    url = f"grpc://127.0.0.1:{port}?ssl=false"
    direct = api_client(url)
    state = small_volume / "state"
    path = state / STATE_FILE
    created: list[int] = []
    try:
        async with QueueObserver(amqp_url, exchange) as observer:
            async with running_daemon(state, amqp_url, exchange, api_url=url) as handle:
                filler = fill(small_volume)
                for _ in range(400):
                    dispatch = await direct.create(
                        mg(), "HELD", soon(600), None, TargetIds(1), payload={"pad": "y" * 40_000}
                    )
                    created.append(int(dispatch.id))
                    _, missing = await readyz(handle.http_port)
                    if f"state store {path}: disk full" in missing:
                        break
                assert f"state store {path}: disk full" in missing
                stopped_in = await handle.stop()
            assert stopped_in < handle.settings.shutdown_timeout
            filler.unlink()
            async with running_daemon(state, amqp_url, exchange, api_url=url):
                for dispatch_id in created:
                    await observer.seen(lambda r, d=dispatch_id: r.is_(d, "created"), WAIT)
    finally:
        await direct.disconnect()
        await server.stop(0)

"""``dispatchd run`` and its link to the dispatch API: stream renewal, a refused key,
and reconnecting to an API process that was killed and started again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from frequenz.client.dispatch.types import TargetIds

from dispatchd import apisync
from dispatchd.localapi.server import LocalApiServer
from tests.shell.daemon_harness import (
    MG,
    QueueObserver,
    api_client,
    http_get,
    metric,
    mg,
    poll,
    running_daemon,
    soon,
)
from tests.shell.scripted_api import CREATED, ScriptedApi, dispatch_pb
from tests.tcpproxy import free_port

WAIT = 15.0
LABELS = {"microgrid_id": str(MG)}


async def test_stream_renewal_is_make_before_break_no_relist_no_reconnect(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    """With a 2 s ``api.stream_timeout`` the stream is renewed twice: no re-list, no
    reconnect counted, and events pushed all along (streamed only, never listed)
    all arrive."""
    exchange = unique_name("e2e")
    async with (
        ScriptedApi() as api,
        QueueObserver(amqp_url, exchange) as observer,
        running_daemon(
            tmp_path,
            amqp_url,
            exchange,
            api_url=api.url,
            extra={"DISPATCHD_API__STREAM_TIMEOUT": "2"},
        ) as handle,
    ):
        reconnects = metric("dispatchd_api_reconnects_total", **LABELS)
        assert api.listings == 1
        pushed: list[int] = []
        now = datetime.now(UTC)
        async with asyncio.timeout(WAIT):
            while api.streams_opened < 3:
                dispatch_id = len(pushed) + 1
                start = now + timedelta(hours=1)
                dispatch = dispatch_pb(dispatch_id, "R", start, timedelta(seconds=5))
                await api.push(CREATED, dispatch)
                pushed.append(dispatch_id)
                await asyncio.sleep(0.05)  # pacing the pushes, not a synchronisation
        for dispatch_id in pushed:
            await observer.seen(lambda r, d=dispatch_id: r.is_(d, "created"), WAIT)
        assert api.listings == 1
        assert metric("dispatchd_api_reconnects_total", **LABELS) == reconnects
        assert handle.daemon._syncs[0].renewals >= 1
    assert len(pushed) > 20
    created = [r.dispatch_id for r in observer.received if r.event == "created"]
    assert sorted(set(created)) == pushed


def _assert_one_error_and_no_warnings(logs: list[dict[str, Any]], *, says: str, fix: str) -> None:
    """One ERROR line saying ``says`` with ``fix`` in its fix, and no per-attempt warning."""
    errors = [entry for entry in logs if entry["log_level"] == "error"]
    assert len(errors) == 1, errors
    assert says in errors[0]["event"]
    assert fix in errors[0]["fix"]
    assert not [entry for entry in logs if entry["event"] == "api stream failed"], logs


async def _three_slow_retries(
    amqp_url: str,
    exchange: str,
    tmp_path: Path,
    server: LocalApiServer,
    api_url: str,
    extra: dict[str, str] | None = None,
) -> tuple[int, bytes, list[dict[str, Any]]]:
    """Run a daemon against ``server`` until it has retried three times: /readyz and the logs."""
    port = await server.start()
    try:
        with structlog.testing.capture_logs() as logs:
            async with running_daemon(
                tmp_path / "daemon",
                amqp_url,
                exchange,
                api_url=api_url.format(port=port),
                extra=extra,
                wait_ready=False,
            ) as handle:
                before = metric("dispatchd_api_reconnects_total", **LABELS)
                await poll(lambda: metric("dispatchd_api_reconnects_total", **LABELS) >= before + 3)
                status, body = await http_get(handle.http_port, "/readyz")
    finally:
        await server.stop(0)
    return status, body, logs


async def test_a_refused_key_is_one_error_named_in_readyz_and_retried_slowly(
    amqp_url: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """UNAUTHENTICATED cannot fix itself: one ERROR line with the cause and the fix,
    /readyz names it, the retries (every 0.3 s here, 60 s by default) say nothing more."""
    monkeypatch.setattr(apisync, "REFUSED_RETRY", 0.3, raising=False)
    server = LocalApiServer(
        listen="127.0.0.1:0", database=tmp_path / "api.sqlite3", auth_keys=["right-key"]
    )
    status, body, logs = await _three_slow_retries(
        amqp_url,
        unique_name("e2e"),
        tmp_path,
        server,
        "grpc://127.0.0.1:{port}?ssl=false",
        extra={"DISPATCHD_API__AUTH_KEY": "wrong-key"},
    )
    assert status == 503
    (refused,) = [m for m in json.loads(body)["missing"] if "refused" in m]
    assert refused.startswith(f"microgrid {MG}: ")
    assert "refused the key (UNAUTHENTICATED)" in refused
    assert "api.auth_key" in refused
    _assert_one_error_and_no_warnings(logs, says="UNAUTHENTICATED", fix="api.auth_key")


async def test_tls_against_a_plaintext_api_is_one_error_named_in_readyz_and_retried_slowly(
    amqp_url: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``grpc://`` is TLS unless ``?ssl=false``; against a plaintext API the handshake
    fails (WRONG_VERSION_NUMBER) on every attempt: one ERROR line with the fix
    (``?ssl=false``), /readyz names it, retried every 0.3 s here (60 s by default)
    without an ``api stream failed`` warning each time."""
    monkeypatch.setattr(apisync, "REFUSED_RETRY", 0.3, raising=False)
    server = LocalApiServer(listen="127.0.0.1:0", database=tmp_path / "api.sqlite3", auth_keys=[])
    status, body, logs = await _three_slow_retries(
        amqp_url, unique_name("e2e"), tmp_path, server, "grpc://127.0.0.1:{port}"
    )
    assert status == 503
    (tls,) = [m for m in json.loads(body)["missing"] if "TLS" in m]
    assert tls.startswith(f"microgrid {MG}: the dispatch API does not speak TLS")
    assert "WRONG_VERSION_NUMBER" in tls
    assert "?ssl=false" in tls
    _assert_one_error_and_no_warnings(logs, says="does not speak TLS", fix="?ssl=false")


@pytest.mark.parametrize(
    ("details", "cause"),
    [
        (  # TLS against the local API (plaintext): what gRPC reports, as reproduced
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:41801: "
            "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL "
            "routines:OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification "
            "context: OK",
            "the dispatch API does not speak TLS",
        ),
        (  # TLS against a TLS server whose self-signed certificate is not trusted
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:44001: "
            "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL "
            "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: self signed certificate: OK",
            "the TLS handshake with the dispatch API failed",
        ),
        (  # plaintext against a TLS server: indistinguishable from a network failure
            "failed to connect to all addresses; last error: UNAVAILABLE: "
            "ipv4:127.0.0.1:34199: Socket closed",
            None,
        ),
    ],
)
def test_which_unavailable_failures_need_the_operator(details: str, cause: str | None) -> None:
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details
    )
    found = apisync._needs_operator(error)
    if cause is None:
        assert found is None
    else:
        assert found is not None
        assert found[0].startswith(cause)
        assert "?ssl=false" in found[1]


@contextlib.asynccontextmanager
async def api_process(port: int, state: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """``dispatchd api`` in its own process on ``port``; killed (SIGKILL) on exit."""
    env = {
        **os.environ,
        "DISPATCHD_API__LOCAL__LISTEN": f"127.0.0.1:{port}",
        "DISPATCHD_API__LOCAL__DATABASE": str(state / "api.sqlite3"),
        "DISPATCHD_STATE__DIR": str(state),
        "DISPATCHD_LOG__LEVEL": "WARNING",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatchd", "api", env=env, stdin=asyncio.subprocess.DEVNULL
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
        await process.wait()


async def answering(port: int) -> float:
    """``time.monotonic()`` when the API's port first accepts a connection.

    Probed over TCP: a gRPC client would add its own reconnect backoff to the
    figure. ``dispatchd api`` listens once it serves.
    """
    async with asyncio.timeout(WAIT):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.01)
                continue
            writer.close()
            return time.monotonic()


async def test_reconnect_after_the_api_process_is_killed_and_restarted(
    amqp_url: str, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    """After a 12 s outage the daemon re-lists within about a second of the API
    answering again, so a dispatch created then and running at once is announced
    running, not only created."""
    exchange = unique_name("e2e")
    port = free_port()
    url = f"grpc://127.0.0.1:{port}?ssl=false"
    async with QueueObserver(amqp_url, exchange) as observer, api_process(port, tmp_path) as first:
        await answering(port)
        async with running_daemon(tmp_path / "daemon", amqp_url, exchange, api_url=url) as h:
            first.send_signal(signal.SIGKILL)
            await first.wait()
            await poll(lambda: metric("dispatchd_api_stream_up", **LABELS) == 0, WAIT)
            await asyncio.sleep(12)  # the outage: gRPC's and the daemon's backoffs grow
            synced = metric("dispatchd_api_last_sync_timestamp_seconds", **LABELS)
            async with api_process(port, tmp_path):
                back = await answering(port)
                direct = api_client(url)
                try:
                    quick = await direct.create(
                        mg(), "QUICK", soon(0.2), timedelta(seconds=4), TargetIds(1)
                    )
                finally:
                    await direct.disconnect()
                await poll(
                    lambda: metric("dispatchd_api_last_sync_timestamp_seconds", **LABELS) > synced,
                    WAIT + 30,
                )
                relisted = time.monotonic()
                running = await observer.seen(lambda r: r.is_(int(quick.id), "running"), WAIT + 30)
                assert h.daemon.ready.is_set()
    assert relisted - back < 2.5, f"re-listed {relisted - back:.2f} s after the API answered"
    assert running.running.occurrence.start == quick.start_time

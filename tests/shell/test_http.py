"""``dispatchd.http`` on its own: HEAD, keep-alive, limits, and the connection cap."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
import structlog
import structlog.testing

from dispatchd import metrics
from dispatchd.http import HttpServer, QueryError
from tests.shell.daemon_harness import poll

MAX_CONNECTIONS = 64
"""``dispatchd.http.MAX_CONNECTIONS``, stated here so the test also runs against older code."""

WAIT = 15.0


class Connection:
    """One raw HTTP/1.1 connection; responses are read by their Content-Length."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, method: str, path: str, extra: str = "") -> None:
        self.writer.write(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode())
        await self.writer.drain()

    async def response(self, *, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        async with asyncio.timeout(WAIT):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode().split("\r\n")
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in lines if line)
            }
            length = int(headers.get("content-length", "0"))
            body = b"" if head_only else await self.reader.readexactly(length)
        return int(status_line.split(" ", 2)[1]), headers, body

    async def request(
        self, method: str, path: str, extra: str = ""
    ) -> tuple[int, dict[str, str], bytes]:
        await self.send(method, path, extra)
        return await self.response(head_only=method == "HEAD")

    async def closed_by_server(self) -> bool:
        """True once the server closed its end (EOF), within ``WAIT``."""
        async with asyncio.timeout(WAIT):
            rest = await self.reader.read()
        return rest == b"" or rest.startswith(b"HTTP/1.1 ")

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def connected(port: int) -> AsyncIterator[Connection]:
    """A ``Connection`` closed on the way out, whatever the test asserted."""
    connection = await Connection.open(port)
    try:
        yield connection
    finally:
        connection.close()


@contextlib.asynccontextmanager
async def serving(
    missing: list[str] | None = None, **options: Any
) -> AsyncIterator[tuple[HttpServer, int]]:
    server = HttpServer("127.0.0.1:0", lambda: list(missing or []), **options)
    port = await server.start()
    try:
        yield server, port
    finally:
        await server.close()


async def test_head_answers_headers_without_a_body_and_keeps_the_connection() -> None:
    async with serving() as (_, port), connected(port) as connection:
        for path in ("/livez", "/readyz", "/metrics", "/"):
            status, head_headers, _ = await connection.request("HEAD", path)
            assert status == 200, path
            # The next bytes on this connection are the next response, not a body.
            status, get_headers, body = await connection.request("GET", path)
            assert status == 200, path
            assert len(body) > 0, path
            assert head_headers["content-type"] == get_headers["content-type"], path


async def test_one_connection_serves_many_requests() -> None:
    async with serving() as (_, port), connected(port) as connection:
        for _ in range(20):
            status, headers, body = await connection.request("GET", "/livez")
            assert (status, body) == (200, b"ok\n")
            assert headers.get("connection", "keep-alive").lower() != "close"


async def test_readyz_and_the_ready_gauge_follow_the_probe() -> None:
    missing = ["broker: not connected (connecting)"]
    async with serving(missing) as (_, port), connected(port) as connection:
        status, _, body = await connection.request("GET", "/readyz")
        assert (status, json.loads(body)) == (503, {"ready": False, "missing": missing})
        assert metrics.REGISTRY.get_sample_value("dispatchd_ready") == 0
        missing.clear()
        status, _, body = await connection.request("GET", "/metrics")
        assert status == 200
        assert b"\ndispatchd_ready 1.0\n" in body
        status, _, body = await connection.request("GET", "/readyz")
        assert (status, json.loads(body)) == (200, {"ready": True, "missing": []})


async def test_unknown_paths_other_methods_and_oversized_requests_are_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving() as (_, port):
        async with connected(port) as connection:
            assert (await connection.request("GET", "/nothing"))[0] == 404
            assert (await connection.request("POST", "/livez", "Content-Length: 0\r\n"))[0] == 405
            # Without a status or schedule provider, their JSON does not exist.
            assert (await connection.request("GET", "/api/v1/status"))[0] == 404
        async with connected(port) as connection:
            status, _, _ = await connection.request("GET", "/" + "a" * 20_000)
            assert status in (400, 414)
        async with connected(port) as connection:
            status, _, _ = await connection.request(
                "GET", "/livez", "X-Big: " + "b" * 20_000 + "\r\n"
            )
            assert status in (400, 431)
        async with connected(port) as connection:
            connection.writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            status, _, _ = await connection.response()
            assert status == 400
    # The client's mistakes are answered, not logged with a traceback.
    assert [r for r in caplog.records if r.exc_info] == []


async def test_schedule_query_errors_are_a_json_400_with_the_reason() -> None:
    def schedule(params: Mapping[str, str]) -> dict[str, Any]:
        if "bad" in params:
            raise QueryError("the window may span at most 31 days")
        return {"echo": dict(params)}

    async with serving(schedule=schedule) as (_, port), connected(port) as connection:
        status, headers, body = await connection.request("GET", "/api/v1/schedule?bad=1")
        assert status == 400
        assert headers["content-type"].startswith("application/json")
        assert json.loads(body) == {"error": "the window may span at most 31 days"}
        status, _, body = await connection.request("GET", "/api/v1/schedule?microgrid_id=7")
        assert (status, json.loads(body)) == (200, {"echo": {"microgrid_id": "7"}})


async def test_an_idle_connection_is_closed_after_the_idle_timeout() -> None:
    async with serving(idle_timeout=0.5) as (server, port):
        async with connected(port) as connection:
            assert await connection.closed_by_server()
        assert server.open_connections == 0


async def test_a_client_that_does_not_read_its_answer_is_cut_off_after_the_idle_timeout() -> None:
    big = {"filler": "x" * 16_000_000}
    async with serving(status=lambda: big, idle_timeout=0.5) as (server, port):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
            await poll(lambda: server.busy_connections == 1)
            await poll(lambda: server.open_connections == 0)
        finally:
            sock.close()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_flood_of_idle_connections_holds_few_descriptors_and_probes_still_answer() -> None:
    """1,100 idle connections used to hold 1,100 descriptors in the daemon until they
    timed out; now the server keeps at most ``MAX_CONNECTIONS`` and closes the oldest."""
    flood = 1100
    async with serving() as (server, port):
        before = open_descriptors()
        idle: list[Connection] = []
        try:
            for _ in range(flood):
                idle.append(await Connection.open(port))
            # Accepts are handled in order: once this probe is answered, every
            # earlier connection has been accepted (and, over the cap, closed).
            probe = await Connection.open(port)
            try:
                status, _, body = await probe.request("GET", "/livez")
            finally:
                probe.close()
            assert (status, body) == (200, b"ok\n")
            # The test's own ends count too: ``flood`` of them, plus the server's.
            assert open_descriptors() - before <= flood + MAX_CONNECTIONS + 8
            # The newest idle connections are still served, the oldest were closed.
            status, _, body = await idle[-1].request("GET", "/livez")
            assert (status, body) == (200, b"ok\n")
            assert await idle[0].closed_by_server()
            assert server.open_connections <= MAX_CONNECTIONS
        finally:
            for connection in idle:
                connection.close()


async def test_when_every_connection_is_busy_a_new_one_gets_503() -> None:
    """Busy: a response the client does not read (too big for the socket buffers)."""
    big = {"filler": "x" * 16_000_000}
    async with serving(max_connections=2, status=lambda: big) as (server, port):
        busy: list[socket.socket] = []
        try:
            for _ in range(2):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
                await asyncio.get_running_loop().sock_sendall(
                    sock, b"GET /api/v1/status HTTP/1.1\r\nHost: localhost\r\n\r\n"
                )
                busy.append(sock)
            await poll(lambda: server.open_connections == 2 and server.busy_connections == 2)
            refused = await Connection.open(port)
            try:
                status, _, body = await refused.response()
                assert (status, body) == (503, b"too many connections\n")
                assert await refused.closed_by_server()
            finally:
                refused.close()
            assert server.refused == 1
        finally:
            for sock in busy:
                sock.close()
        # Once the busy ones are gone, new connections are served again.
        await poll(lambda: server.open_connections == 0)
        async with connected(port) as connection:
            assert (await connection.request("GET", "/livez"))[0] == 200


async def test_connection_close_and_http_1_0_end_the_connection_after_the_answer() -> None:
    async with serving() as (server, port):
        async with connected(port) as connection:
            status, headers, body = await connection.request(
                "GET", "/livez", "Connection: close\r\n"
            )
            assert (status, body, headers["connection"]) == (200, b"ok\n", "close")
            assert await connection.closed_by_server()
        async with connected(port) as connection:
            connection.writer.write(b"GET /livez HTTP/1.0\r\n\r\n")
            status, headers, body = await connection.response()
            assert (status, body, headers["connection"]) == (200, b"ok\n", "close")
            assert await connection.closed_by_server()
        await poll(lambda: server.open_connections == 0)


async def test_pipelined_requests_are_answered_in_order_and_a_small_body_is_skipped() -> None:
    """An empty line before a request line is skipped, as RFC 9112 asks."""
    pipelined = (
        b"GET /livez HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /api/v1/status HTTP/1.1\r\n\r\n"
        b"HEAD /livez HTTP/1.1\r\n\r\n"
        b"\r\nGET /nothing HTTP/1.1\r\n\r\n"
    )
    async with serving(status=lambda: {"status": "ok"}) as (_, port), connected(port) as connection:
        connection.writer.write(pipelined)
        assert (await connection.response())[::2] == (200, b"ok\n")
        assert (await connection.response())[::2] == (200, b'{"status":"ok"}\n')
        status, headers, _ = await connection.response(head_only=True)
        assert (status, headers["content-length"]) == (200, "3")
        assert (await connection.response())[0] == 404


async def test_bodies_over_the_limit_chunked_bodies_and_too_many_headers_are_refused() -> None:
    async with serving() as (_, port):
        for extra, expected in (
            ("Content-Length: 5000\r\n", 413),
            ("Transfer-Encoding: chunked\r\n", 411),
            ("Content-Length: many\r\n", 400),
            ("".join(f"X-H{i}: {i}\r\n" for i in range(65)), 431),
            ("no colon here\r\n", 400),
        ):
            async with connected(port) as connection:
                status, headers, _ = await connection.request("GET", "/livez", extra)
                assert (status, headers["connection"]) == (expected, "close"), extra[:40]
                assert await connection.closed_by_server()


async def test_the_first_value_of_a_repeated_query_parameter_counts() -> None:
    def echo(params: Mapping[str, str]) -> dict[str, Any]:
        return {"echo": dict(params)}

    async with serving(schedule=echo) as (_, port), connected(port) as connection:
        status, _, body = await connection.request(
            "GET", "/api/v1/schedule?type=A%20B&type=C&empty="
        )
        assert (status, json.loads(body)) == (200, {"echo": {"type": "A B", "empty": ""}})


async def test_a_failing_handler_is_a_500_and_logged_and_the_connection_serves_on() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("status probe broke")

    with structlog.testing.capture_logs() as logs:
        async with serving(status=broken) as (_, port), connected(port) as connection:
            assert (await connection.request("GET", "/api/v1/status"))[0] == 500
            assert (await connection.request("GET", "/livez"))[::2] == (200, b"ok\n")
    failures = [entry for entry in logs if entry["log_level"] == "error"]
    assert [(entry["event"], entry["path"]) for entry in failures] == [
        ("http handler failed", "/api/v1/status")
    ]
    assert failures[0]["exc_info"] is True

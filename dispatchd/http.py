"""HTTP endpoints for operators: /metrics, /livez (/healthz) and /readyz.

Three fixed GET routes do not justify a web framework, so this is a minimal
HTTP/1.1 responder on ``asyncio.start_server``: it answers one request per
connection and closes it, which is all Prometheus and health probes need.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Final

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dispatchd import metrics

_log = structlog.get_logger(__name__)

_REQUEST_LIMIT: Final = 8192
_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS_503: Final = "Service Unavailable"

ReadinessProbe = Callable[[], list[str]]
"""Returns what is missing for readiness; an empty list means ready."""


class HttpServer:
    """Serves the operator endpoints until closed."""

    def __init__(
        self, listen: str, readiness: ReadinessProbe, refresh: Callable[[], None] = lambda: None
    ) -> None:
        host, _, port = listen.rpartition(":")
        self._host = host.strip("[]") or "127.0.0.1"
        self._port = int(port)
        self._readiness = readiness
        self._refresh = refresh
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Bind and return the port (useful when listening on port 0)."""
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        port: int = self._server.sockets[0].getsockname()[1]
        _log.info("http listening", address=f"{self._host}:{port}")
        return port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            status, content_type, body = self._route(head[:_REQUEST_LIMIT])
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status, content_type, body = 400, "text/plain", b"bad request\n"
        reason = _REASONS.get(status, _REASONS_503)
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        try:
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _route(self, head: bytes) -> tuple[int, str, bytes]:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3:
            return 400, "text/plain", b"bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if target == b"/metrics":
            self._refresh()
            return 200, CONTENT_TYPE_LATEST, generate_latest(metrics.REGISTRY)
        if target in (b"/livez", b"/healthz"):
            return 200, "text/plain", b"ok\n"
        if target == b"/readyz":
            missing = self._readiness()
            body = json.dumps({"ready": not missing, "missing": missing}).encode() + b"\n"
            return (503 if missing else 200), "application/json", body
        return 404, "text/plain", b"not found\n"

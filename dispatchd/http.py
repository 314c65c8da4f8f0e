"""HTTP for operators: /metrics, /livez (/healthz), /readyz, the status page and its JSON.

On aiohttp's server, which brings HEAD without a body, keep-alive and limits
on the request line and headers. On top of it a cap on open connections:
the HTTP port shares the process's file descriptors with the gRPC server
and the broker connection, so a flood of idle connections must not use
them up. At the cap a new connection replaces the oldest idle one (so a
health probe still gets in); only when every connection is busy with a
request is the new one answered 503 and closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any, Final

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dispatchd import metrics

_log = structlog.get_logger(__name__)

MAX_CONNECTIONS: Final = 64
"""Connections open at once; probes and scrapes need a handful."""
IDLE_TIMEOUT: Final = 30.0
"""Seconds an idle connection (before its first request or between two) stays open."""
REQUEST_LINE_LIMIT: Final = 8190
"""Bytes in the request line and in each header line."""
HEADER_COUNT_LIMIT: Final = 64
BODY_LIMIT: Final = 1024
"""No route takes a body."""
_REFUSED: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 21\r\nConnection: close\r\n\r\ntoo many connections\n"
)

ReadinessProbe = Callable[[], list[str]]
"""Returns what is missing for readiness; an empty list means ready."""
StatusProbe = Callable[[], Mapping[str, Any]]
"""The daemon's health as a JSON object (``/api/v1/status``)."""
QueryParams = Mapping[str, str]
"""A request's query parameters."""
ScheduleProbe = Callable[[QueryParams], Mapping[str, Any]]
"""The query parameters of ``/api/v1/schedule`` -> its JSON object; raises ``QueryError``."""


class _DropClientErrors(logging.Filter):
    """A malformed or oversized request is the client's fault: it gets its 400, and the
    log no traceback (aiohttp logs some at ERROR). A failing handler is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, HttpProcessingError)


_SERVER_LOG = logging.getLogger("dispatchd.http.server")
_SERVER_LOG.addFilter(_DropClientErrors())


class QueryError(ValueError):
    """A request the server will not answer: its status and a one-line reason."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class HttpServer:
    """Serves the operator endpoints until closed."""

    def __init__(
        self,
        listen: str,
        readiness: ReadinessProbe,
        refresh: Callable[[], None] = lambda: None,
        *,
        status: StatusProbe | None = None,
        schedule: ScheduleProbe | None = None,
        unpublished: Callable[[], int] | None = None,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        host, _, port = listen.rpartition(":")
        self._host = host.strip("[]") or "127.0.0.1"
        self._port = int(port)
        self._readiness = readiness
        self._refresh = refresh
        self._status = status
        self._schedule = schedule
        self._unpublished = unpublished
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self.refused = 0
        """Connections answered 503 because every open one was busy."""

    async def start(self) -> int:
        """Bind and return the port (useful when listening on port 0)."""
        app = web.Application(client_max_size=BODY_LIMIT)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/livez", self._live)
        app.router.add_get("/healthz", self._live)
        app.router.add_get("/readyz", self._ready)
        app.router.add_get("/", self._page)
        app.router.add_get("/api/v1/status", self._status_json)
        app.router.add_get("/api/v1/schedule", self._schedule_json)
        runner = self._runner = web.AppRunner(
            app,
            access_log=None,
            logger=_SERVER_LOG,
            handle_signals=False,
            shutdown_timeout=1.0,
            keepalive_timeout=self._idle_timeout,
            max_line_size=REQUEST_LINE_LIMIT,
            max_field_size=REQUEST_LINE_LIMIT,
            max_headers=HEADER_COUNT_LIMIT,
        )
        await runner.setup()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, self._host, self._port)
        port: int = self._server.sockets[0].getsockname()[1]
        _log.info("http listening", address=f"{self._host}:{port}")
        return port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def open_connections(self) -> int:
        """Connections the server holds now (for tests and the cap)."""
        return 0 if self._runner is None else len(self._handlers().connections)

    # ------------------------------------------------------------ connections

    def _handlers(self) -> web.Server:
        assert self._runner is not None and self._runner.server is not None
        return self._runner.server

    def _accept(self) -> asyncio.Protocol:
        """The protocol for a new connection, keeping at most ``max_connections`` open."""
        handlers = self._handlers()
        connections = handlers.connections  # oldest first
        if len(connections) >= self._max_connections:
            idle = next((c for c in connections if not _busy(c)), None)
            if idle is None:
                self.refused += 1
                return _Refused()
            idle.force_close()
        return handlers()

    # ----------------------------------------------------------------- routes

    async def _metrics(self, _: web.Request) -> web.Response:
        self._refresh()
        metrics.READY.set(0 if self._readiness() else 1)
        return web.Response(
            body=generate_latest(metrics.REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _live(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _ready(self, _: web.Request) -> web.Response:
        missing = self._readiness()
        metrics.READY.set(0 if missing else 1)
        body: dict[str, Any] = {"ready": not missing, "missing": missing}
        if self._unpublished is not None:
            # Ready means synced and connected; messages may still be on their way.
            body["unpublished"] = self._unpublished()
        return _json(body, 503 if missing else 200)

    async def _page(self, _: web.Request) -> web.Response:
        return web.Response(body=_status_page(), content_type="text/html", charset="utf-8")

    async def _status_json(self, _: web.Request) -> web.Response:
        if self._status is None:
            raise web.HTTPNotFound()
        return _json(self._status())

    async def _schedule_json(self, request: web.Request) -> web.Response:
        if self._schedule is None:
            raise web.HTTPNotFound()
        try:
            return _json(self._schedule(request.query))
        except QueryError as error:
            return _json({"error": str(error)}, error.status)


def _busy(handler: RequestHandler) -> bool:
    """Whether a request is being answered on this connection (aiohttp keeps the flag)."""
    return bool(getattr(handler, "_request_in_progress", False))


class _Refused(asyncio.Protocol):
    """Answers 503 and closes: every connection is busy."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_REFUSED)
        transport.close()


def _json(document: Mapping[str, Any], status: int = 200) -> web.Response:
    body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    return web.Response(body=body, status=status, content_type="application/json")


_PAGE: bytes | None = None


def _status_page() -> bytes:
    """The page, read from the package once."""
    global _PAGE
    if _PAGE is None:
        _PAGE = (resources.files("dispatchd") / "web" / "status.html").read_bytes()
    return _PAGE

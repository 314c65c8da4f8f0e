"""HTTP for operators: /metrics, /livez (/healthz), /readyz, the status page and its JSON.

A small HTTP/1.1 server on asyncio streams: a handful of GET routes with no
request bodies need neither a web framework nor its memory (aiohttp cost
the daemon about 9 MiB of resident memory for these seven routes). It does
what probes, scrapers and browsers rely on: HEAD without a body, keep-alive
(and ``Connection: close``), limits on the request line and headers, an idle
timeout, and a cap on open connections: the HTTP port shares the process's
file descriptors with the gRPC server and the broker connection, so a flood
of idle connections must not use them up. At the cap a new connection
replaces the oldest idle one (so a health probe still gets in); only when
every connection is busy with a request is the new one answered 503 and
closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlsplit

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dispatchd import metrics

_log = structlog.get_logger(__name__)

MAX_CONNECTIONS: Final = 64
"""Connections open at once; probes and scrapes need a handful."""
IDLE_TIMEOUT: Final = 30.0
"""Seconds an idle connection (before its first request or between two) stays open;
also the most a client may take to send one request's line and headers, and to
read one response."""
REQUEST_LINE_LIMIT: Final = 8190
"""Bytes in the request line and in each header line."""
HEADER_COUNT_LIMIT: Final = 64
BODY_LIMIT: Final = 1024
"""No route takes a body; a small one is read and ignored, a larger one refused."""
EMPTY_LINES_SKIPPED: Final = 2
"""Empty lines taken for nothing before a request line (RFC 9112, section 2.2)."""
LINGER_SECONDS: Final = 1.0
LINGER_BYTES: Final = 1 << 20
"""At most this long and this much input is read and dropped after a refused request."""
_REFUSED: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 21\r\nConnection: close\r\n\r\ntoo many connections\n"
)
_TEXT: Final = "text/plain; charset=utf-8"
_JSON: Final = "application/json; charset=utf-8"
_HTML: Final = "text/html; charset=utf-8"

ReadinessProbe = Callable[[], list[str]]
"""Returns what is missing for readiness; an empty list means ready."""
StatusProbe = Callable[[], Mapping[str, Any]]
"""The daemon's health as a JSON object (``/api/v1/status``)."""
QueryParams = Mapping[str, str]
"""A request's query parameters (the first value of each name)."""
ScheduleProbe = Callable[[QueryParams], Mapping[str, Any]]
"""The query parameters of ``/api/v1/schedule`` -> its JSON object; raises ``QueryError``."""


class QueryError(ValueError):
    """A request the server will not answer: its status and a one-line reason."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = _TEXT


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str
    query: dict[str, str]
    keep_alive: bool


class _BadRequest(Exception):
    """The client's mistake: answered with ``status`` and the connection closed."""

    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(eq=False, slots=True)
class _Connection:
    writer: asyncio.StreamWriter
    busy: bool = False
    task: asyncio.Task[None] | None = field(default=None)


Route = Callable[[_Request], Awaitable[Response]]


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
        self._server: asyncio.Server | None = None
        self._connections: dict[_Connection, None] = {}
        """Open connections, oldest first."""
        self._routes: dict[str, Route] = {
            "/metrics": self._metrics,
            "/livez": self._live,
            "/healthz": self._live,
            "/readyz": self._ready,
            "/": self._page,
            "/api/v1/status": self._status_json,
            "/api/v1/schedule": self._schedule_json,
        }
        self.refused = 0
        """Connections answered 503 because every open one was busy."""

    async def start(self) -> int:
        """Bind and return the port (useful when listening on port 0)."""
        self._server = await asyncio.start_server(
            self._serve, self._host, self._port, limit=REQUEST_LINE_LIMIT + 2
        )
        port: int = self._server.sockets[0].getsockname()[1]
        _log.info("http listening", address=f"{self._host}:{port}")
        return port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [c.task for c in self._connections if c.task is not None]
        for connection in list(self._connections):
            connection.writer.transport.abort()  # a client not reading must not hold us
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def open_connections(self) -> int:
        """Connections the server holds now (for tests and the cap)."""
        return len(self._connections)

    @property
    def busy_connections(self) -> int:
        """Connections answering a request now."""
        return sum(1 for connection in self._connections if connection.busy)

    # ------------------------------------------------------------ connections

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: requests in turn until the client or a limit ends it.

        Connections are started in the order they were accepted, so the cap
        below sees them oldest first.
        """
        if not self._admit():
            self.refused += 1
            writer.write(_REFUSED)
            writer.close()
            return
        connection = _Connection(writer, task=asyncio.current_task())
        self._connections[connection] = None
        try:
            await self._requests(reader, connection)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        except asyncio.CancelledError:
            # Only close() cancels: this connection's task ends here, quietly
            # (asyncio would log a cancelled connection task as an error).
            pass
        finally:
            self._connections.pop(connection, None)
            writer.close()

    def _admit(self) -> bool:
        """Room for one more connection, made by closing the oldest idle one if need be."""
        if len(self._connections) < self._max_connections:
            return True
        idle = next((c for c in self._connections if not c.busy), None)
        if idle is None:
            return False
        idle.writer.close()  # its task sees the end of the stream and finishes
        del self._connections[idle]
        return True

    async def _requests(self, reader: asyncio.StreamReader, connection: _Connection) -> None:
        writer = connection.writer
        while True:
            try:
                async with asyncio.timeout(self._idle_timeout):
                    request = await _read_request(reader)
            except TimeoutError:
                return
            except _BadRequest as error:
                await _respond(writer, Response(error.status, f"{error}\n".encode()), close=True)
                await _linger(reader, writer)
                return
            if request is None:
                return  # closed between requests
            connection.busy = True
            try:
                response = await self._answer(request)
                async with asyncio.timeout(self._idle_timeout):
                    await _respond(
                        writer,
                        response,
                        close=not request.keep_alive,
                        head=request.method == "HEAD",
                    )
            except TimeoutError:
                writer.transport.abort()  # a client that does not read must not hold a connection
                return
            finally:
                connection.busy = False
            if not request.keep_alive:
                return

    async def _answer(self, request: _Request) -> Response:
        route = self._routes.get(request.path)
        if route is None:
            return Response(HTTPStatus.NOT_FOUND, b"404: Not Found\n")
        if request.method not in ("GET", "HEAD"):
            return Response(HTTPStatus.METHOD_NOT_ALLOWED, b"405: Method Not Allowed\n")
        try:
            return await route(request)
        except Exception:
            _log.exception("http handler failed", path=request.path)
            return Response(HTTPStatus.INTERNAL_SERVER_ERROR, b"500: Internal Server Error\n")

    # ----------------------------------------------------------------- routes

    async def _metrics(self, _: _Request) -> Response:
        self._refresh()
        metrics.READY.set(0 if self._readiness() else 1)
        return Response(HTTPStatus.OK, generate_latest(metrics.REGISTRY), CONTENT_TYPE_LATEST)

    async def _live(self, _: _Request) -> Response:
        return Response(HTTPStatus.OK, b"ok\n")

    async def _ready(self, _: _Request) -> Response:
        missing = self._readiness()
        metrics.READY.set(0 if missing else 1)
        body: dict[str, Any] = {"ready": not missing, "missing": missing}
        if self._unpublished is not None:
            # Ready means synced and connected; messages may still be on their way.
            body["unpublished"] = self._unpublished()
        return _json(body, HTTPStatus.SERVICE_UNAVAILABLE if missing else HTTPStatus.OK)

    async def _page(self, _: _Request) -> Response:
        return Response(HTTPStatus.OK, _status_page(), _HTML)

    async def _status_json(self, _: _Request) -> Response:
        if self._status is None:
            return Response(HTTPStatus.NOT_FOUND, b"404: Not Found\n")
        return _json(self._status())

    async def _schedule_json(self, request: _Request) -> Response:
        if self._schedule is None:
            return Response(HTTPStatus.NOT_FOUND, b"404: Not Found\n")
        try:
            return _json(self._schedule(request.query))
        except QueryError as error:
            return _json({"error": str(error)}, error.status)


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """The next request's line and headers (its small body read and dropped);
    ``None`` if the client closed the connection before sending one."""
    line = ""
    for _ in range(EMPTY_LINES_SKIPPED + 1):  # a client may end its last body with an extra CRLF
        read = await _read_line(reader, HTTPStatus.REQUEST_URI_TOO_LONG, first=True)
        if read is None:
            return None
        line = read
        if line:
            break
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "malformed request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    while True:
        header = await _read_line(reader, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        if not header:
            break
        if len(headers) >= HEADER_COUNT_LIMIT:
            raise _BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
        name, colon, value = header.partition(":")
        if not colon or not name or name != name.strip():
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "malformed header")
        headers[name.lower()] = value.strip()
    await _skip_body(reader, headers)
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection and (version != "HTTP/1.0" or "keep-alive" in connection)
    url = urlsplit(target)
    query: dict[str, str] = {}
    for name, value in parse_qsl(url.query, keep_blank_values=True):
        query.setdefault(name, value)
    return _Request(method, unquote(url.path) or "/", query, keep_alive)


async def _read_line(
    reader: asyncio.StreamReader, too_long: HTTPStatus, *, first: bool = False
) -> str | None:
    """One CRLF-terminated line without its ending; ``None`` at a clean EOF before it."""
    try:
        raw = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise _BadRequest(too_long, "line too long") from None
    except asyncio.IncompleteReadError as error:
        if first and not error.partial:
            return None
        raise
    if len(raw) > REQUEST_LINE_LIMIT + 2:
        raise _BadRequest(too_long, "line too long")
    try:
        return raw.rstrip(b"\r\n").decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "malformed line") from None


async def _skip_body(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> None:
    if "transfer-encoding" in headers:
        raise _BadRequest(HTTPStatus.LENGTH_REQUIRED, "no route takes a chunked body")
    text = headers.get("content-length", "0")
    if not text.isdigit():
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "malformed Content-Length")
    length = int(text)
    if length > BODY_LIMIT:
        raise _BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "no route takes a body")
    if length:
        await reader.readexactly(length)


async def _respond(
    writer: asyncio.StreamWriter, response: Response, *, close: bool, head: bool = False
) -> None:
    status = HTTPStatus(response.status)
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
    ]
    if close:
        lines.append("Connection: close")
    if status == HTTPStatus.METHOD_NOT_ALLOWED:
        lines.append("Allow: GET, HEAD")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if not head:
        writer.write(response.body)
    with contextlib.suppress(ConnectionError):
        await writer.drain()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After refusing a request, read what the client still sends before closing: a
    socket closed with unread input is reset, and the reset can cost the client the
    answer it has not read yet."""
    if not writer.can_write_eof():
        return
    with contextlib.suppress(OSError):
        writer.write_eof()
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(LINGER_SECONDS):
            for _ in range(LINGER_BYTES // REQUEST_LINE_LIMIT):
                if not await reader.read(REQUEST_LINE_LIMIT):
                    return


def _json(document: Mapping[str, Any], status: int = HTTPStatus.OK) -> Response:
    body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    return Response(status, body, _JSON)


_PAGE: bytes | None = None


def _status_page() -> bytes:
    """The page, read from the package once."""
    global _PAGE
    if _PAGE is None:
        _PAGE = (resources.files("dispatchd") / "web" / "status.html").read_bytes()
    return _PAGE

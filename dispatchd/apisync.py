"""API sync: keep one microgrid's dispatches flowing from the dispatch API.

For each connection it opens the stream first, waits until the server has
registered it (initial metadata), then lists every page, hands the list over,
and only then the events the stream delivered meanwhile and afterwards. So
nothing created or changed during start-up or a reconnect is missed; the
engine's stale-event rules drop what the list already covered. A lost stream
is reopened with exponential backoff and full jitter, then re-listed.

Calls go through ``frequenz-client-dispatch``'s ``DispatchApiClient`` (its
channel carries the auth key and HMAC signing). The stream is driven through
the client's stub rather than its broadcaster because the broadcaster does not
tell when the server has accepted the stream, which the ordering above needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Final, TypeVar

import grpc
import structlog
from frequenz.api.common.v1alpha8.pagination.pagination_params_pb2 import PaginationParams
from frequenz.api.dispatch.v1.dispatch_pb2 import (
    ListMicrogridDispatchesRequest,
    ListMicrogridDispatchesResponse,
    StreamMicrogridDispatchesRequest,
)
from frequenz.client.common.streaming import Event
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.types import DispatchEvent

from dispatchd import metrics
from dispatchd.apichannel import ApiClient
from dispatchd.config import Settings, split_host_port
from dispatchd.core.model import Dispatch

_log = structlog.get_logger(__name__)

_T = TypeVar("_T")

_HEADERS_WAIT: Final = 5.0
"""How long to wait for the server to acknowledge a stream before listing anyway."""


def api_url(settings: Settings, local_port: int | None = None) -> str:
    """The URL the client should use: ``api.url``, or the local API's address.

    The local API is plain text; ``local_port`` is its bound port when it
    listens on port 0.
    """
    configured = settings.api.client_url
    if configured is not None:
        return configured
    host, port = split_host_port(settings.api.local.listen)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"grpc://{host}:{local_port if local_port is not None else port}?ssl=false"


def api_client(settings: Settings, local_port: int | None = None) -> DispatchApiClient:
    """A ``DispatchApiClient`` with the configured credentials and timeouts."""
    api = settings.api
    return ApiClient(
        channel_options=[("grpc.max_receive_message_length", api.max_receive_bytes)],
        server_url=api_url(settings, local_port),
        # The client insists on a key; a server without auth ignores this one.
        auth_key=api.auth_key.get_secret_value() if api.auth_key else "unauthenticated",
        sign_secret=api.sign_secret.get_secret_value() if api.sign_secret else None,
        call_timeout=timedelta(seconds=api.call_timeout),
        stream_timeout=timedelta(seconds=api.stream_timeout),
    )


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic GC while a listing's objects are built (and in the daemon's step).

    A big listing allocates hundreds of thousands of objects that all survive;
    the collector would traverse the growing heap again and again for nothing
    (about a fifth of the daemon's step at 50k dispatches). It runs again
    right after.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True, slots=True)
class Listed:
    """A complete listing of one microgrid; ``initial`` for the first of a run."""

    microgrid_id: int
    dispatches: tuple[Dispatch, ...]
    initial: bool


@dataclass(frozen=True, slots=True)
class Streamed:
    """One stream event."""

    microgrid_id: int
    event: Event
    dispatch: Dispatch


SyncItem = Listed | Streamed
Deliver = Callable[[SyncItem], Awaitable[None]]


STABLE_AFTER = 10.0
"""Seconds a listed stream must stay up for its loss to restart the backoff.

Every stream ends (``api.stream_timeout`` at the latest) and is then reopened
at once; an API that accepts, lists and drops at once is backed off from
instead of re-listed in a tight loop.
"""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter, so many daemons don't retry in step."""

    initial: float = 0.5
    maximum: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0, min(self.maximum, self.initial * 2**attempt))


class ApiSync:
    """Runs the stream-then-list loop for one microgrid until cancelled."""

    def __init__(
        self,
        client: DispatchApiClient,
        microgrid_id: int,
        deliver: Deliver,
        *,
        backoff: Backoff = Backoff(),
        page_size: int = 1000,
    ) -> None:
        self._client = client
        self._microgrid_id = microgrid_id
        self._deliver = deliver
        self._backoff = backoff
        self._page_size = page_size
        self._rng = random.Random()
        self._attempt = 0
        """Connection attempts since the last one that stayed up ``STABLE_AFTER`` seconds."""
        self._up_since: float | None = None
        self._labels = {"microgrid_id": str(microgrid_id)}
        # Export the per-microgrid series from the start (0), not from the first failure.
        metrics.API_RECONNECTS.labels(**self._labels)
        metrics.API_STREAM_UP.labels(**self._labels)
        self.synced = asyncio.Event()
        """Set once the first full listing has been delivered."""

    async def run(self) -> None:
        """Sync forever; every failure is logged, counted and retried."""
        log = _log.bind(microgrid_id=self._microgrid_id)
        while True:
            try:
                await self._connect_once()
                log.info("api stream ended by the server, reconnecting")
            except grpc.aio.AioRpcError as error:
                log.warning(
                    "api stream failed",
                    code=error.code().name,
                    details=error.details(),
                    retry_attempt=self._attempt + 1,
                )
            except (OSError, grpc.RpcError) as error:
                log.warning("api stream failed", error=str(error), retry_attempt=self._attempt + 1)
            metrics.API_STREAM_UP.labels(**self._labels).set(0)
            metrics.API_RECONNECTS.labels(**self._labels).inc()
            up_since, self._up_since = self._up_since, None
            if up_since is not None and time.monotonic() - up_since >= STABLE_AFTER:
                self._attempt = 0
            await asyncio.sleep(self._backoff.delay(self._attempt, self._rng))
            self._attempt += 1

    async def _connect_once(self) -> None:
        """One stream lifetime: open, list, then forward events until it ends."""
        request = StreamMicrogridDispatchesRequest(microgrid_id=self._microgrid_id)
        call = self._client.stub.StreamMicrogridDispatches(
            request, timeout=self._client.stream_timeout.total_seconds()
        )
        mid = self._microgrid_id
        events: asyncio.Queue[DispatchEvent | BaseException | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read(call, events))
        try:
            await self._wait_accepted(call)
            await self._deliver(await self._list())
            self._up_since = time.monotonic()
            metrics.API_STREAM_UP.labels(**self._labels).set(1)
            metrics.API_LAST_SYNC_TIMESTAMP.labels(**self._labels).set(time.time())
            self.synced.set()
            while (item := await events.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                dispatch = self._convert(lambda: Dispatch.from_client(item.dispatch, mid))
                if dispatch is not None:
                    await self._deliver(Streamed(mid, item.event, dispatch))
        finally:
            reader.cancel()
            call.cancel()

    async def _wait_accepted(self, call: grpc.aio.UnaryStreamCall) -> None:  # type: ignore[type-arg]
        """Wait for the response headers: the server has registered the stream.

        A server that sends headers only with its first event would block us,
        so after a bound we list anyway (the window is then the server's).
        """
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation
            # that arrives as the awaited result does, and the daemon's stop would hang.
            async with asyncio.timeout(_HEADERS_WAIT):
                await asyncio.shield(call.initial_metadata())
        except TimeoutError:
            _log.debug("no stream headers yet, listing anyway", microgrid_id=self._microgrid_id)

    async def _read(
        self,
        call: grpc.aio.UnaryStreamCall,  # type: ignore[type-arg]
        events: asyncio.Queue[DispatchEvent | BaseException | None],
    ) -> None:
        try:
            async for response in call:
                event = self._convert(lambda: DispatchEvent.from_protobuf(response))  # noqa: B023
                if event is not None:
                    events.put_nowait(event)
        except grpc.aio.AioRpcError as error:
            events.put_nowait(error)
            return
        events.put_nowait(None)

    def _convert(self, convert: Callable[[], _T]) -> _T | None:
        """``convert()``, or None (logged and counted) if the dispatch cannot be taken."""
        try:
            return convert()
        except Exception as error:  # one bad dispatch must not stop the rest
            self._skipped(error, None)
            return None

    def _skipped(self, error: Exception, dispatch_id: int | None) -> None:
        _log.error(
            "api dispatch skipped: cannot convert it",
            microgrid_id=self._microgrid_id,
            dispatch_id=dispatch_id,
            error=f"{type(error).__name__}: {error}",
        )
        metrics.API_SKIPPED_DISPATCHES.labels(**self._labels).inc()

    async def _list(self) -> Listed:
        started = time.perf_counter()
        dispatches: list[Dispatch] = []
        # Through the client's stub (its channel signs and authenticates) rather
        # than client.list, so each protobuf becomes our Dispatch directly instead
        # of via the client's Dispatch: half the conversion cost of a big sync.
        request = ListMicrogridDispatchesRequest(
            microgrid_id=self._microgrid_id,
            pagination_params=PaginationParams(page_size=self._page_size),
        )
        while True:
            response: ListMicrogridDispatchesResponse = (
                await self._client.stub.ListMicrogridDispatches(
                    request, timeout=self._client.call_timeout.total_seconds()
                )
            )
            with gc_paused():
                for message in response.dispatches:
                    try:
                        dispatches.append(Dispatch.from_protobuf(message, self._microgrid_id))
                    except Exception as error:  # one bad dispatch must not stop the rest
                        self._skipped(error, message.metadata.dispatch_id)
            token = response.pagination_info.next_page_token
            if not token:
                break
            request.pagination_params.CopyFrom(PaginationParams(page_token=token))
        initial = not self.synced.is_set()
        _log.info(
            "listed dispatches",
            microgrid_id=self._microgrid_id,
            count=len(dispatches),
            initial=initial,
            seconds=round(time.perf_counter() - started, 3),
        )
        return Listed(self._microgrid_id, tuple(dispatches), initial)

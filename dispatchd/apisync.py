"""API sync: keep one microgrid's dispatches flowing from the dispatch API.

For each connection it opens the stream first, waits briefly until the server
has registered it (initial metadata), then lists every page, hands the list
over, and only then the events the stream delivered meanwhile and afterwards.
So nothing created or changed during start-up or a reconnect is missed; the
engine's stale-event rules drop what the list already covered. A lost stream
is reopened with exponential backoff and full jitter, then re-listed.

A server may send the stream's headers only with its first event. Then the
daemon does not wait for them: it lists at once (ready without delay) and
lists again once the stream is confirmed (its headers arrive) or after
``CONFIRM_WAIT`` at the latest; the second listing covers whatever changed
between the first one and the server registering the stream.

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
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

import grpc
import structlog
from frequenz.api.common.v1alpha8.pagination.pagination_params_pb2 import PaginationParams
from frequenz.api.common.v1alpha8.streaming.event_pb2 import Event as EventProto
from frequenz.api.dispatch.v1.dispatch_pb2 import (
    ListMicrogridDispatchesRequest,
    ListMicrogridDispatchesResponse,
    StreamMicrogridDispatchesRequest,
)
from frequenz.client.common.streaming import Event as StreamEvent
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.types import DispatchEvent
from grpc import ChannelConnectivity

from dispatchd import metrics
from dispatchd.apichannel import SUBCHANNEL_OF_ITS_OWN, ApiClient, ClientPool
from dispatchd.core.model import Dispatch
from dispatchd.settings import Settings, split_host_port

_EVENT_DELETED = EventProto.EVENT_DELETED
_log = structlog.get_logger(__name__)

_T = TypeVar("_T")

HEADERS_GRACE = 0.1
"""Seconds to wait for a stream's headers before listing without them: a server that
sends them on registering answers within a round trip, and one listing is enough."""
CONFIRM_WAIT = 5.0
"""Seconds after a listing made without the stream's headers by which it is made
again, if the headers (or the first event) have not confirmed the stream before."""


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


OPENING_AT_ONCE: Final = 32
"""Microgrids that open their stream and list at the same time (over all channels). A
thousand streams opened at once make the API answer every stream's headers late,
past ``HEADERS_GRACE``, and each microgrid would be listed twice."""


RECONNECT_BACKOFF_MS: Final = (250, 1000)
"""gRPC's own connection backoff (initial, maximum): an API that answers again is
reached within about a second, instead of gRPC's default of up to 120 s."""


def api_clients(settings: Settings, local_port: int | None = None) -> ClientPool:
    """Clients with the configured credentials and timeouts, one channel (and
    connection) per ``api.max_streams_per_channel`` microgrids."""
    return ClientPool(
        lambda: api_client(settings, local_port), settings.api.max_streams_per_channel
    )


def api_client(settings: Settings, local_port: int | None = None) -> DispatchApiClient:
    """A ``DispatchApiClient`` with the configured credentials and timeouts, on a
    connection of its own."""
    api = settings.api
    return ApiClient(
        channel_options=[
            ("grpc.max_receive_message_length", api.max_receive_bytes),
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
            SUBCHANNEL_OF_ITS_OWN,
        ],
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
    unseen_since: datetime | None = None
    """When the previous stream was lost: what changed since was not streamed."""


@dataclass(frozen=True, slots=True)
class Streamed:
    """One stream event."""

    microgrid_id: int
    event: StreamEvent
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


REFUSED_RETRY = 60.0
"""Seconds between attempts while the API refuses the key, or the TLS handshake fails:
neither can fix itself."""
_REFUSED: Final = {
    grpc.StatusCode.UNAUTHENTICATED: "the dispatch API refused the key (UNAUTHENTICATED)",
    grpc.StatusCode.PERMISSION_DENIED: (
        "the dispatch API refused access to the microgrid (PERMISSION_DENIED)"
    ),
}
_REFUSED_FIX: Final = (
    "set api.auth_key (or api.auth_key_file) to a key the API accepts for this microgrid, "
    "and api.sign_secret if it wants signed requests"
)
_TLS_TO_PLAINTEXT: Final = (
    "the dispatch API does not speak TLS (TLS handshake failed: WRONG_VERSION_NUMBER)"
)
_TLS_TO_PLAINTEXT_FIX: Final = (
    "add ?ssl=false to api.url if the server is plaintext, or point api.url at its TLS port"
)
_TLS_FAILED: Final = "the TLS handshake with the dispatch API failed"
_TLS_FAILED_FIX: Final = (
    "add ?ssl=false to api.url if the server is plaintext; if its certificate is from a "
    "private CA, add ssl_root_certificates_path=<CA file> to api.url"
)


def _needs_operator(error: grpc.aio.AioRpcError) -> tuple[str, str] | None:
    """(cause, fix) of a failure that cannot fix itself, else ``None``: a refused key,
    or a TLS handshake that fails (TLS against a plaintext server: gRPC reports
    ``UNAVAILABLE`` with the handshake error in the details)."""
    code = error.code()
    if code in _REFUSED:
        return _REFUSED[code], _REFUSED_FIX
    details = error.details() or ""
    if code is grpc.StatusCode.UNAVAILABLE and "handshake" in details.lower():
        if "WRONG_VERSION_NUMBER" in details:
            return _TLS_TO_PLAINTEXT, _TLS_TO_PLAINTEXT_FIX
        return _TLS_FAILED, _TLS_FAILED_FIX
    return None


READY_JITTER = 0.2
"""Up to this many seconds between the API answering again and the re-list, so many
daemons do not all list at the same instant."""


class _StreamEnded(Exception):
    """The server ended the stream without an error."""


class _Stream:
    """One stream call and the events its reader received, in order."""

    def __init__(
        self,
        client: DispatchApiClient,
        microgrid_id: int,
        convert: Callable[..., DispatchEvent | None],
    ) -> None:
        request = StreamMicrogridDispatchesRequest(microgrid_id=microgrid_id)
        self._convert = convert
        self.opened = time.monotonic()
        self.call = client.stub.StreamMicrogridDispatches(
            request, timeout=client.stream_timeout.total_seconds()
        )
        self.events: asyncio.Queue[DispatchEvent | BaseException | None] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                event = self._convert(
                    lambda: DispatchEvent.from_protobuf(response),  # noqa: B023
                    int(response.dispatch.metadata.dispatch_id),
                    deleted=response.event == _EVENT_DELETED,
                )
                if event is not None:  # one event it cannot take must not stop the rest
                    self.events.put_nowait(event)
        except grpc.aio.AioRpcError as error:
            self.events.put_nowait(error)
            return
        self.events.put_nowait(None)

    def close(self) -> None:
        self._reader.cancel()
        self.call.cancel()


def _ended_at_deadline(item: BaseException | None) -> bool:
    """The stream ran into its own deadline (``api.stream_timeout``): not the API's fault."""
    return (
        isinstance(item, grpc.aio.AioRpcError) and item.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    )


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
        refused_retry: float | None = None,
        opening: asyncio.Semaphore | None = None,
    ) -> None:
        self._client = client
        self._opening = opening or asyncio.Semaphore(1)
        """Shared by the daemon's microgrids: how many may open and list at once."""
        self._microgrid_id = microgrid_id
        self._deliver = deliver
        self._backoff = backoff
        self._page_size = page_size
        self._refused_retry = REFUSED_RETRY if refused_retry is None else refused_retry
        self._lost_at: datetime | None = None
        """When the last stream that had listed was lost (``None``: never lost)."""
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
        self.problem: str | None = None
        """A failure that needs the operator (a refused key, a TLS mismatch), for /readyz."""
        self._problem_cause: str | None = None
        """The cause of ``problem``, logged once at ERROR until it changes or clears."""
        self.renewals = 0
        """Streams renewed before their deadline (no re-list), for tests."""
        self.relists = 0
        """Listings made again because the first went out before the stream's headers."""
        self.skipped: set[int] = set()
        """Dispatches of the API it cannot convert (as of the last listing and the events
        since): they never run, so they are counted as invalid."""

    @property
    def microgrid_id(self) -> int:
        return self._microgrid_id

    @property
    def renew_lead(self) -> float:
        """Seconds before a stream's deadline at which its successor is opened."""
        return min(10.0, self._client.stream_timeout.total_seconds() / 4)

    async def run(self) -> None:
        """Sync forever; every failure is logged, counted and retried."""
        log = _log.bind(microgrid_id=self._microgrid_id)
        while True:
            code: grpc.StatusCode | None = None
            try:
                await self._connect_once()
                log.info("api stream ended by the server, reconnecting")
            except grpc.aio.AioRpcError as error:
                code = error.code()
                needs_operator = _needs_operator(error)
                if needs_operator is not None:
                    await self._refused(error, *needs_operator)
                    continue
                log.warning(
                    "api stream failed",
                    code=code.name,
                    details=error.details(),
                    retry_attempt=self._attempt + 1,
                )
            except (OSError, grpc.RpcError) as error:
                code = grpc.StatusCode.UNAVAILABLE
                log.warning("api stream failed", error=str(error), retry_attempt=self._attempt + 1)
            metrics.API_STREAM_UP.labels(**self._labels).set(0)
            metrics.API_RECONNECTS.labels(**self._labels).inc()
            if self._up_since is not None:
                self._lost_at = datetime.now(UTC)
            up_since, self._up_since = self._up_since, None
            if up_since is not None and time.monotonic() - up_since >= STABLE_AFTER:
                self._attempt = 0
            await self._pause(code)
            self._attempt += 1

    async def _pause(self, code: grpc.StatusCode | None) -> None:
        """Before reconnecting: wait for an unreachable API to answer, else back off.

        The channel's connectivity is a cheap probe: gRPC retries the connection
        at most ``RECONNECT_BACKOFF_MS`` apart, and the re-list starts as soon as
        it is up. An API that is reachable but failed the call is backed off from.
        """
        channel = self._client.channel
        unreachable = code is grpc.StatusCode.UNAVAILABLE
        if unreachable and channel.get_state(try_to_connect=True) is not ChannelConnectivity.READY:
            # Bounded, so a channel that never gets ready (TLS mismatch) is retried and logged.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._backoff.maximum):
                    await channel.channel_ready()
                    await asyncio.sleep(self._rng.uniform(0, READY_JITTER))
            return
        await asyncio.sleep(self._backoff.delay(self._attempt, self._rng))

    async def _refused(self, error: grpc.aio.AioRpcError, cause: str, fix: str) -> None:
        """A failure that cannot fix itself (a refused key, TLS against a plaintext
        server): one ERROR line with the cause and the fix, /readyz says it, retry slowly."""
        problem = f"{cause}: {error.details()}; {fix}"
        if cause != self._problem_cause:
            _log.error(
                cause,
                microgrid_id=self._microgrid_id,
                details=error.details(),
                fix=fix,
                retry_every=self._refused_retry,
            )
        else:
            _log.debug("dispatch API still fails the same way", microgrid_id=self._microgrid_id)
        self.problem = problem
        self._problem_cause = cause
        metrics.API_STREAM_UP.labels(**self._labels).set(0)
        metrics.API_RECONNECTS.labels(**self._labels).inc()
        self._up_since = None
        await asyncio.sleep(self._refused_retry)

    async def _connect_once(self) -> None:
        """One connection: open, list, then forward events, renewing the stream in time."""
        streams: list[_Stream] = []
        try:
            async with self._opening:
                streams.append(self._open_stream())
                confirmed = await self._wait_accepted(streams[-1].call, HEADERS_GRACE)
                listing_started = datetime.now(UTC)
                listed = await self._list()
            await self._deliver(replace(listed, unseen_since=self._lost_at))
            self._lost_at = None
            if self.problem is not None:
                _log.info(
                    "dispatch API link works again",
                    microgrid_id=self._microgrid_id,
                    was=self._problem_cause,
                )
                self.problem = None
                self._problem_cause = None
            self._up_since = time.monotonic()
            metrics.API_STREAM_UP.labels(**self._labels).set(1)
            metrics.API_LAST_SYNC_TIMESTAMP.labels(**self._labels).set(time.time())
            self.synced.set()
            if not confirmed:
                await self._relist_once_confirmed(streams[-1], listing_started)
            while True:
                await self._forward_until(streams[-1], self._renewal_due(streams[-1]))
                streams.append(self._open_stream())
                confirmed = await self._hand_over(streams[-2], streams[-1])
                streams.pop(0).close()
                self.renewals += 1
                _log.debug("api stream renewed", microgrid_id=self._microgrid_id)
                if not confirmed:
                    await self._relist_once_confirmed(streams[-1], datetime.now(UTC), now=True)
        except _StreamEnded:
            return
        finally:
            for stream in streams:
                stream.close()

    async def _relist_once_confirmed(
        self, stream: _Stream, listing_started: datetime, *, now: bool = False
    ) -> None:
        """The first listing went out before the server confirmed the stream: list again
        once it does (or after ``CONFIRM_WAIT``), so a change made between that listing
        and the stream's registration is not lost. Events wait in the stream's queue.
        With ``now``, list at once first (a renewal whose predecessor ended meanwhile)."""
        if now:
            await self._deliver(replace(await self._list(), unseen_since=listing_started))
        if not await self._wait_accepted(stream.call, CONFIRM_WAIT):
            _log.debug("stream still unconfirmed, listing again", microgrid_id=self._microgrid_id)
        listed = await self._list()
        await self._deliver(replace(listed, unseen_since=listing_started))
        self.relists += 1

    def _open_stream(self) -> _Stream:
        return _Stream(self._client, self._microgrid_id, self._convert)

    def _renewal_due(self, stream: _Stream) -> float:
        """When (monotonic) the successor of ``stream`` is opened, before its deadline."""
        return stream.opened + self._client.stream_timeout.total_seconds() - self.renew_lead

    async def _forward_until(self, stream: _Stream, moment: float) -> None:
        """Deliver the stream's events until ``moment``; its end or error is raised."""
        while (left := moment - time.monotonic()) > 0:
            try:
                async with asyncio.timeout(left):
                    item = await stream.events.get()
            except TimeoutError:
                return
            await self._forward(item)

    async def _forward(self, item: DispatchEvent | BaseException | None) -> None:
        if item is None:
            raise _StreamEnded
        if isinstance(item, BaseException):
            raise item
        mid = self._microgrid_id
        dispatch_id = int(item.dispatch.id)
        deleted = item.event == StreamEvent.DELETED
        dispatch = self._convert(
            lambda: Dispatch.from_client(item.dispatch, mid), dispatch_id, deleted=deleted
        )
        if dispatch is not None:
            self.skipped.discard(dispatch_id)  # taken now (or deleted)
        if dispatch is not None:
            await self._deliver(Streamed(mid, item.event, dispatch))

    async def _hand_over(self, old: _Stream, new: _Stream) -> bool:
        """Make before break: keep forwarding ``old`` until ``new`` is accepted and ``old``
        has ended, so every event is on at least one of them (the engine ignores the
        repeats). ``new``'s events wait in its queue meanwhile.

        Returns whether ``new`` was accepted before ``old`` ended; if not, an event may
        have fallen in between and the caller lists again. ``old`` failing before that
        is a failure like any other (reconnect and re-list).
        """
        accepted = asyncio.ensure_future(new.call.initial_metadata())
        getting: asyncio.Future[DispatchEvent | BaseException | None] | None = None
        try:
            while True:
                getting = asyncio.ensure_future(old.events.get())
                waiting: set[asyncio.Future[Any]] = {getting}
                if not accepted.done():
                    waiting.add(accepted)
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if getting not in done:
                    getting.cancel()  # an item it had not taken stays in the queue
                    continue
                item = getting.result()
                if item is None or isinstance(item, BaseException):
                    if accepted.done():
                        return True
                    if _ended_at_deadline(item):
                        return False
                    raise item if isinstance(item, BaseException) else _StreamEnded
                await self._forward(item)
        finally:
            accepted.cancel()
            if getting is not None:
                getting.cancel()

    async def _wait_accepted(
        self,
        call: grpc.aio.UnaryStreamCall,  # type: ignore[type-arg]
        bound: float,
    ) -> bool:
        """Whether the response headers came within ``bound`` seconds: the server has
        registered the stream (a failed call counts too: its events queue ends in it)."""
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation
            # that arrives as the awaited result does, and the daemon's stop would hang.
            async with asyncio.timeout(bound):
                await asyncio.shield(call.initial_metadata())
        except TimeoutError:
            return False
        return True

    def _convert(
        self, convert: Callable[[], _T], dispatch_id: int | None = None, *, deleted: bool = False
    ) -> _T | None:
        """``convert()``, or None (logged and counted) if the dispatch cannot be taken.

        ``dispatch_id`` is kept in ``skipped`` until it converts or is ``deleted``.
        """
        try:
            return convert()
        except Exception as error:  # one bad dispatch must not stop the rest
            self._skipped(error, dispatch_id)
            if dispatch_id is not None:
                if deleted:
                    self.skipped.discard(dispatch_id)
                else:
                    self.skipped.add(dispatch_id)
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
        skipped: set[int] = set()
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
                        skipped.add(int(message.metadata.dispatch_id))
            token = response.pagination_info.next_page_token
            if not token:
                break
            request.pagination_params.CopyFrom(PaginationParams(page_token=token))
        self.skipped = skipped
        initial = not self.synced.is_set()
        _log.info(
            "listed dispatches",
            microgrid_id=self._microgrid_id,
            count=len(dispatches),
            initial=initial,
            seconds=round(time.perf_counter() - started, 3),
        )
        return Listed(self._microgrid_id, tuple(dispatches), initial)

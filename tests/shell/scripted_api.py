"""A dispatch API server whose every answer the test decides.

The local API derives its events from real changes, so it cannot send a
stale, duplicated or out-of-order event, change a dispatch's type, or drop a
dispatch from its list without a DELETED event. :class:`ScriptedApi` is a
real ``grpc.aio`` server on 127.0.0.1:0 serving ``MicrogridDispatchService``
(List and Stream; the rest answer UNIMPLEMENTED) from state the test sets::

    async with ScriptedApi() as api:
        async with running_daemon(tmp_path, amqp_url, exchange, api_url=api.url):
            d = dispatch_pb(1, "A", soon(1), timedelta(seconds=2))
            api.put(d)                    # List returns it from now on
            await api.push(CREATED, d)    # every open stream gets the event
            api.cut_streams()             # streams end UNAVAILABLE: reconnect, re-list
            await api.wait_streams(2, 5)  # the daemon subscribed again

Like the local API it sends the initial metadata as soon as a stream is
registered, so the daemon lists right after subscribing and nothing pushed
afterwards is lost. With ``headers_on_first_event`` it sends them only with
the first event (as frequenz-client-dispatch's FakeService does), and
``registering`` (when given) holds each new stream back from registering
until the test sets it. Filters and sort options are ignored: List returns the
put dispatches by id, ``page_size`` (capped at ``max_page_size``) at a time,
the next page token being the last id of the page.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final

import grpc
import grpc.aio
from frequenz.api.common.v1alpha8.pagination.pagination_info_pb2 import PaginationInfo
from frequenz.api.common.v1alpha8.streaming.event_pb2 import (
    EVENT_CREATED,
    EVENT_DELETED,
    EVENT_UPDATED,
    Event,
)
from frequenz.api.dispatch.v1 import dispatch_pb2_grpc
from frequenz.api.dispatch.v1.dispatch_pb2 import (
    Dispatch,
    DispatchData,
    DispatchMetadata,
    ListMicrogridDispatchesRequest,
    ListMicrogridDispatchesResponse,
    RecurrenceRule,
    StreamMicrogridDispatchesRequest,
    StreamMicrogridDispatchesResponse,
    TargetComponents,
)
from google.protobuf.timestamp_pb2 import Timestamp

from tests.shell.daemon_harness import MG

CREATED: Final = EVENT_CREATED
UPDATED: Final = EVENT_UPDATED
DELETED: Final = EVENT_DELETED

Context = grpc.aio.ServicerContext[Any, Any]


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment.astimezone(UTC))
    return stamp


def dispatch_pb(
    dispatch_id: int,
    type: str,
    start_time: datetime,
    duration: timedelta | None,
    *,
    active: bool = True,
    payload: Mapping[str, Any] | None = None,
    target: Iterable[int] = (1,),
    recurrence: RecurrenceRule | None = None,
    create_time: datetime | None = None,
    update_time: datetime | None = None,
) -> Dispatch:
    """One dispatch as the API sends it.

    ``duration`` is whole seconds (the API's unit). ``update_time`` defaults to
    ``create_time``, which defaults to now. ``end_time`` is set for a one-off
    with a duration (the API computes it; nothing here needs it otherwise).
    """
    created = create_time or datetime.now(UTC)
    data = DispatchData(
        type=type,
        start_time=_timestamp(start_time),
        target=TargetComponents(component_ids=TargetComponents.IdSet(ids=list(target))),
        is_active=active,
        recurrence=recurrence,
    )
    if duration is not None:
        data.duration = int(duration.total_seconds())
    data.payload.update(dict(payload or {}))
    metadata = DispatchMetadata(
        dispatch_id=dispatch_id,
        create_time=_timestamp(created),
        update_time=_timestamp(update_time or created),
    )
    if duration is not None and recurrence is None:
        metadata.end_time.CopyFrom(_timestamp(start_time + duration))
    return Dispatch(metadata=metadata, data=data)


def revised(dispatch: Dispatch, update_time: datetime, **data: Any) -> Dispatch:
    """A copy with a new ``update_time`` and the given ``DispatchData`` fields changed.

    ``payload`` takes a mapping; other keys are ``DispatchData`` attributes
    (``type``, ``is_active``, ...).
    """
    copy = Dispatch()
    copy.CopyFrom(dispatch)
    copy.metadata.update_time.CopyFrom(_timestamp(update_time))
    for name, value in data.items():
        if name == "payload":
            copy.data.payload.Clear()
            copy.data.payload.update(dict(value))
        else:
            setattr(copy.data, name, value)
    return copy


class ScriptedApi(dispatch_pb2_grpc.MicrogridDispatchServiceServicer):
    """List and Stream for one microgrid, from dispatches and events the test controls."""

    def __init__(
        self,
        microgrid_id: int = MG,
        *,
        max_page_size: int = 1000,
        headers_on_first_event: bool = False,
        registering: asyncio.Event | None = None,
    ) -> None:
        self.microgrid_id = microgrid_id
        self.max_page_size = max_page_size
        self.headers_on_first_event = headers_on_first_event
        self.registering = registering
        self.first_event_sent_after_listings: int | None = None
        """Complete listings served before the first stream event went out."""
        self.url = ""
        """``grpc://127.0.0.1:<port>?ssl=false`` once started."""
        self.streams_opened = 0
        """Streams ever subscribed (initial metadata sent)."""
        self.listings = 0
        """Last pages served, i.e. complete listings (for a lister that pages to the end)."""
        self._dispatches: dict[int, Dispatch] = {}
        self._streams: set[asyncio.Queue[StreamMicrogridDispatchesResponse | None]] = set()
        self._changed = asyncio.Condition()
        self._server: grpc.aio.Server | None = None

    async def __aenter__(self) -> ScriptedApi:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        dispatch_pb2_grpc.add_MicrogridDispatchServiceServicer_to_server(self, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        self.url = f"grpc://127.0.0.1:{port}?ssl=false"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(0)

    # ------------------------------------------------------------- the script

    def put(self, dispatch: Dispatch) -> None:
        """List returns ``dispatch`` (replacing one with its id) from now on; nothing streamed."""
        self._dispatches[dispatch.metadata.dispatch_id] = dispatch

    def remove(self, dispatch_id: int) -> None:
        """List no longer returns the dispatch; nothing streamed."""
        del self._dispatches[dispatch_id]

    async def push(self, event: Event.ValueType, dispatch: Dispatch) -> None:
        """Send one event to every open stream (fails if none is open: it would be lost)."""
        if not self._streams:
            raise RuntimeError("no open stream to push to")
        response = StreamMicrogridDispatchesResponse(dispatch=dispatch, event=event)
        for stream in self._streams:
            await stream.put(response)

    def cut_streams(self) -> int:
        """End every open stream with UNAVAILABLE; returns how many."""
        streams, self._streams = self._streams, set()
        for stream in streams:
            stream.put_nowait(None)
        return len(streams)

    async def wait_streams(self, count: int, timeout: float) -> None:  # noqa: ASYNC109
        """Until ``count`` streams were ever subscribed (``TimeoutError`` otherwise)."""
        await self._wait(lambda: self.streams_opened >= count, timeout)

    async def wait_listings(self, count: int, timeout: float) -> None:  # noqa: ASYNC109
        """Until ``count`` complete listings were served (``TimeoutError`` otherwise)."""
        await self._wait(lambda: self.listings >= count, timeout)

    async def _wait(self, done: Callable[[], bool], timeout: float) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(done)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------ the service

    async def _unimplemented(self, request: Any, context: Context) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "scripted API: List and Stream only")

    CreateMicrogridDispatch = UpdateMicrogridDispatch = _unimplemented
    GetMicrogridDispatch = DeleteMicrogridDispatch = _unimplemented

    async def ListMicrogridDispatches(
        self, request: ListMicrogridDispatchesRequest, context: Context
    ) -> ListMicrogridDispatchesResponse:
        if request.microgrid_id != self.microgrid_id:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown microgrid")
        paging = request.pagination_params
        after = int(paging.page_token) if paging.page_token else 0
        size = min(paging.page_size or self.max_page_size, self.max_page_size)
        ids = sorted(i for i in self._dispatches if i > after)
        page = ids[:size]
        last = len(page) == len(ids)
        response = ListMicrogridDispatchesResponse(
            dispatches=[self._dispatches[i] for i in page],
            pagination_info=PaginationInfo(
                total_items=len(self._dispatches),
                next_page_token="" if last else str(page[-1]),
            ),
        )
        if last:
            self.listings += 1
            await self._notify()
        return response

    async def StreamMicrogridDispatches(
        self, request: StreamMicrogridDispatchesRequest, context: Context
    ) -> AsyncIterator[StreamMicrogridDispatchesResponse]:
        if request.microgrid_id != self.microgrid_id:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown microgrid")
        # ``None`` queued by ``cut_streams`` ends the stream with UNAVAILABLE.
        stream: asyncio.Queue[StreamMicrogridDispatchesResponse | None] = asyncio.Queue()
        if self.registering is not None:
            await self.registering.wait()
        self._streams.add(stream)
        try:
            if not self.headers_on_first_event:
                await context.send_initial_metadata(())
            self.streams_opened += 1
            await self._notify()
            while (response := await stream.get()) is not None:
                if self.first_event_sent_after_listings is None:
                    self.first_event_sent_after_listings = self.listings
                yield response
            await context.abort(grpc.StatusCode.UNAVAILABLE, "stream cut by the test")
        finally:
            self._streams.discard(stream)

"""ApiClient: DispatchApiClient's auth and signing, plus extra channel options;
ClientPool: many microgrids spread over channels, each its own connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from frequenz.api.dispatch.v1.dispatch_pb2 import ListMicrogridDispatchesRequest
from frequenz.client.dispatch.types import TargetIds

from dispatchd.apichannel import ApiClient, ClientPool
from dispatchd.localapi import LocalApiServer
from dispatchd.localapi import server as server_module
from tests.shell.daemon_harness import DaemonHandle, QueueObserver, mg, running_daemon, soon


async def test_signed_and_authenticated_calls_pass(tmp_path: Path) -> None:
    api = LocalApiServer(
        listen="127.0.0.1:0", database=tmp_path / "d.sqlite3", auth_keys=["k"], sign_secret="s"
    )
    port = await api.start()
    url = f"grpc://127.0.0.1:{port}?ssl=false"
    request = ListMicrogridDispatchesRequest(microgrid_id=1)
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    good = ApiClient(server_url=url, auth_key="k", sign_secret="s", channel_options=options)
    unsigned = ApiClient(server_url=url, auth_key="k", channel_options=options)
    try:
        response = await good.stub.ListMicrogridDispatches(request, timeout=10)
        assert list(response.dispatches) == []
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await unsigned.stub.ListMicrogridDispatches(request, timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await good.disconnect()
        await unsigned.disconnect()
        await api.stop(0)


def test_urls_are_checked_like_the_official_client() -> None:
    with pytest.raises(ValueError, match="grpc://"):
        ApiClient(server_url="http://127.0.0.1:1", auth_key="k")
    with pytest.raises(ValueError):
        ApiClient(server_url="grpc://127.0.0.1:1?unknown=1", auth_key="k")


class _Client:
    """Stands in for a ``DispatchApiClient``: the pool only makes and disconnects them."""

    def __init__(self) -> None:
        self.disconnected = False

    async def disconnect(self) -> None:
        self.disconnected = True


def _pool(per_channel: int) -> tuple[ClientPool, list[_Client]]:
    """A pool of stand-ins, and the list of those it made, in order."""
    made: list[_Client] = []

    def make() -> Any:
        made.append(_Client())
        return made[-1]

    return ClientPool(make, per_channel), made


def test_a_pool_fills_each_channel_up_to_its_share_then_opens_the_next() -> None:
    pool, made = _pool(per_channel=2)
    clients = {microgrid_id: pool.client_for(microgrid_id) for microgrid_id in (1, 2, 3, 4, 5)}
    assert pool.channels == 3
    assert [clients[i] for i in (1, 2, 3, 4, 5)] == [made[0], made[0], made[1], made[1], made[2]]
    assert pool.client_for(3) is made[1]  # asked again: the same channel, no new place taken
    pool.release(1)
    pool.release(1)  # a second release frees nothing more
    assert pool.client_for(6) is made[0]  # the freed place, before any new channel
    assert pool.client_for(7) is made[2]
    assert pool.client_for(8) is made[3]
    assert pool.channels == 4


async def test_a_pool_disconnects_every_channel_it_opened() -> None:
    pool, made = _pool(per_channel=1)
    for microgrid_id in (1, 2, 3):
        pool.client_for(microgrid_id)
    await pool.disconnect()
    assert len(made) == 3
    assert all(client.disconnected for client in made)


STREAM_LIMIT = 4
"""The API server's HTTP/2 ``MAX_CONCURRENT_STREAMS``, as a proxy in front of it sets one."""
MICROGRIDS = tuple(range(1, 11))


@contextlib.asynccontextmanager
async def _behind_a_limited_api(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    amqp_url: str,
    exchange: str,
    *,
    per_channel: int,
    wait_ready: bool,
) -> AsyncIterator[DaemonHandle]:
    """A daemon syncing ``MICROGRIDS`` from a real local API server that lets one
    connection carry ``STREAM_LIMIT`` calls at once."""
    options = [*server_module._SERVER_OPTIONS, ("grpc.max_concurrent_streams", STREAM_LIMIT)]
    monkeypatch.setattr(server_module, "_SERVER_OPTIONS", options)
    api = LocalApiServer(listen="127.0.0.1:0", database=tmp_path / "api.sqlite3")
    port = await api.start()
    try:
        async with running_daemon(
            tmp_path / "daemon",
            amqp_url,
            exchange,
            microgrid_ids=MICROGRIDS,
            api_url=f"grpc://127.0.0.1:{port}?ssl=false",
            extra={"DISPATCHD_API__MAX_STREAMS_PER_CHANNEL": str(per_channel)},
            wait_ready=wait_ready,
        ) as handle:
            yield handle
    finally:
        await api.stop(0)


async def test_microgrids_beyond_a_servers_stream_limit_sync_on_channels_of_their_own(
    amqp_url: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ten microgrids against a server allowing four calls per connection: two per
    channel, every one synced (ready) and its stream live."""
    exchange = unique_name("channels")
    async with (
        QueueObserver(amqp_url, exchange) as observer,
        _behind_a_limited_api(
            tmp_path, monkeypatch, amqp_url, exchange, per_channel=2, wait_ready=True
        ) as handle,
    ):
        for microgrid_id in MICROGRIDS:
            created = await handle.client.create(
                mg(microgrid_id), "LIVE", soon(3600), timedelta(seconds=5), TargetIds(1)
            )
            await observer.seen(
                lambda r, m=microgrid_id, d=int(created.id): (
                    r.message.dispatch.microgrid_id == m and r.is_(d, "created")
                ),
                WAIT,
            )


async def test_one_channel_for_more_microgrids_than_the_limit_leaves_some_unsynced(
    amqp_url: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The failure the pool prevents: all ten on one connection, the streams beyond
    the server's limit and the listings behind them wait, and ready never comes."""
    exchange = unique_name("channels")
    async with _behind_a_limited_api(
        tmp_path, monkeypatch, amqp_url, exchange, per_channel=len(MICROGRIDS), wait_ready=False
    ) as handle:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(STUCK_FOR):
                await handle.daemon.ready.wait()
        status, body = await handle.http_get("/readyz")
        assert status == 503
        assert len(json.loads(body)["missing"]) >= len(MICROGRIDS) - STREAM_LIMIT


STUCK_FOR = 5.0
"""Seconds without ready that show the listings are stuck: ten listings of empty
microgrids take well under a second on loopback."""
WAIT = 15.0

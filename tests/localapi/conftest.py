"""Fixtures: a real LocalApiServer on a free loopback port and official clients."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import pytest
from frequenz.client.dispatch import DispatchApiClient

from dispatchd.localapi import LocalApiServer
from tests.localapi.helpers import AUTH_KEY


@pytest.fixture
def database(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "dispatches.sqlite3"


@pytest.fixture
async def server(database: pathlib.Path) -> AsyncIterator[tuple[LocalApiServer, int]]:
    """An unauthenticated server (any key is fine)."""
    api = LocalApiServer(listen="127.0.0.1:0", database=database)
    port = await api.start()
    yield api, port
    await api.stop(0)


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[[int], DispatchApiClient]]:
    """Build clients for a port; streams and channels are closed afterwards."""
    clients: list[DispatchApiClient] = []

    def build(
        port: int, auth_key: str = AUTH_KEY, sign_secret: str | None = None
    ) -> DispatchApiClient:
        client = DispatchApiClient(
            server_url=f"grpc://127.0.0.1:{port}?ssl=false",
            auth_key=auth_key,
            sign_secret=sign_secret,
            call_timeout=timedelta(seconds=10),
        )
        clients.append(client)
        return client

    yield build
    for client in clients:
        for stream in list(client._streams.values()):
            await stream.stop()
        await client.disconnect()


@pytest.fixture
async def client(
    server: tuple[LocalApiServer, int], make_client: Callable[[int], DispatchApiClient]
) -> DispatchApiClient:
    return make_client(server[1])

"""A ``DispatchApiClient`` whose gRPC channel takes extra channel options.

``DispatchApiClient`` builds its channel from the URL alone, with gRPC's
default 4 MiB receive limit: a List page or stream event larger than that
fails the whole sync. This client builds the same kind of channel (same URL
forms, TLS options, keep-alive, auth and signing interceptors) with the
options it is given, such as ``grpc.max_receive_message_length``.
``ClientPool`` spreads many microgrids' streams over several such channels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from types import EllipsisType
from typing import Any
from urllib.parse import urlparse

import grpc
import grpc.aio
from frequenz.client.base.authentication import (
    AuthenticationInterceptorUnaryStream,
    AuthenticationInterceptorUnaryUnary,
)
from frequenz.client.base.channel import KeepAliveOptions, _parse_query_params
from frequenz.client.base.signing import (
    SigningInterceptorUnaryStream,
    SigningInterceptorUnaryUnary,
)
from frequenz.client.dispatch import DispatchApiClient

ChannelOption = tuple[str, Any]
_DEFAULT_PORT = 443


class ApiClient(DispatchApiClient):
    """``DispatchApiClient`` plus ``channel_options`` for its channel."""

    def __init__(self, *, channel_options: Sequence[ChannelOption] = (), **kwargs: Any) -> None:
        self._extra_options = list(channel_options)
        super().__init__(**kwargs)

    def connect(
        self,
        server_url: str | None = None,
        *,
        auth_key: str | EllipsisType | None = ...,
        sign_secret: str | EllipsisType | None = ...,
    ) -> None:
        """Connect like ``DispatchApiClient``, with the extra channel options."""
        reconnect = False
        if server_url is not None and server_url != self._server_url:
            self._server_url, reconnect = server_url, True
        if auth_key is not ... and auth_key != self._auth_key:
            self._auth_key, reconnect = auth_key, True
        if sign_secret is not ... and sign_secret != self._sign_secret:
            self._sign_secret, reconnect = sign_secret, True
        if self.is_connected and not reconnect:
            return
        interceptors: list[Any] = []
        if self._auth_key is not None:
            interceptors += [
                AuthenticationInterceptorUnaryUnary(self._auth_key),
                AuthenticationInterceptorUnaryStream(self._auth_key),
            ]
        if self._sign_secret is not None:
            interceptors += [
                SigningInterceptorUnaryUnary(self._sign_secret),
                SigningInterceptorUnaryStream(self._sign_secret),
            ]
        self._channel = open_channel(self._server_url, interceptors, self._extra_options)
        self._stub = self._create_stub(self._channel)


def open_channel(
    url: str, interceptors: Sequence[Any], extra_options: Sequence[ChannelOption]
) -> grpc.aio.Channel:
    """A channel for ``grpc://host[:port][?ssl=…&…]`` as ``DispatchApiClient`` reads
    it (TLS unless ``ssl=false``; the same query parameters), with ``extra_options``."""
    parsed = urlparse(url)
    if parsed.scheme != "grpc" or not parsed.hostname:
        raise ValueError(f"expected grpc://host:port, got {url!r}")
    query = _parse_query_params(url, parsed.query)
    target = parsed.netloc if parsed.port else f"{parsed.netloc}:{_DEFAULT_PORT}"
    options: list[ChannelOption] = []
    if query.keep_alive is not False:
        defaults = KeepAliveOptions()
        options += [
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.keepalive_time_ms", _millis(query.keep_alive_interval or defaults.interval)),
            ("grpc.keepalive_timeout_ms", _millis(query.keep_alive_timeout or defaults.timeout)),
        ]
    options += extra_options
    if query.ssl is False:
        return grpc.aio.insecure_channel(target, options, interceptors=interceptors)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(query.ssl_root_certificates_path),
        private_key=_read(query.ssl_private_key_path),
        certificate_chain=_read(query.ssl_certificate_chain_path),
    )
    return grpc.aio.secure_channel(target, credentials, options, interceptors=interceptors)


def _millis(duration: timedelta) -> int:
    return int(duration.total_seconds() * 1000)


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


class ClientPool:
    """API clients for many microgrids: one gRPC channel per ``per_channel`` of them.

    Every microgrid holds one stream open for as long as it runs, and an
    HTTP/2 connection carries at most as many at once as the server allows
    (``MAX_CONCURRENT_STREAMS``: 100 in HAProxy's default, 128 in nginx's and
    AWS ALB's). The streams beyond it, and the listings behind them, would wait
    for a slot that never frees. So a channel takes at most ``per_channel``
    microgrids, leaving room for listings, and the next one opens a channel of
    its own; ``make`` gives each its own connection (``SUBCHANNEL_OF_ITS_OWN``).
    """

    def __init__(self, make: Callable[[], DispatchApiClient], per_channel: int) -> None:
        self._make = make
        self._per_channel = per_channel
        self._clients: list[DispatchApiClient] = []
        self._taken: list[int] = []
        """Microgrids on each channel."""
        self._client_of: dict[int, int] = {}

    def client_for(self, microgrid_id: int) -> DispatchApiClient:
        """The microgrid's client: the first channel with room, else a new one."""
        index = self._client_of.get(microgrid_id)
        if index is None:
            index = next(
                (i for i, taken in enumerate(self._taken) if taken < self._per_channel),
                len(self._clients),
            )
            if index == len(self._clients):
                self._clients.append(self._make())
                self._taken.append(0)
            self._taken[index] += 1
            self._client_of[microgrid_id] = index
        return self._clients[index]

    def release(self, microgrid_id: int) -> None:
        """The microgrid's sync has stopped: its place on the channel is free again."""
        index = self._client_of.pop(microgrid_id, None)
        if index is not None:
            self._taken[index] -= 1

    @property
    def channels(self) -> int:
        return len(self._clients)

    async def disconnect(self) -> None:
        for client in self._clients:
            await client.disconnect()


SUBCHANNEL_OF_ITS_OWN: ChannelOption = ("grpc.use_local_subchannel_pool", 1)
"""Without it, gRPC lets channels to the same target share one connection."""

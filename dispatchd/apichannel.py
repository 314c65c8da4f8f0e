"""A ``DispatchApiClient`` whose gRPC channel takes extra channel options.

``DispatchApiClient`` builds its channel from the URL alone, with gRPC's
default 4 MiB receive limit: a List page or stream event larger than that
fails the whole sync. This client builds the same kind of channel (same URL
forms, TLS options, keep-alive, auth and signing interceptors) with the
options it is given, such as ``grpc.max_receive_message_length``.
"""

from __future__ import annotations

from collections.abc import Sequence
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

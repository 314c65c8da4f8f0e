"""The local dispatch API server: gRPC (``grpc.aio``) in front of SQLite."""

from __future__ import annotations

import asyncio
import ipaddress
import pathlib
import socket
from collections.abc import Sequence

import grpc
import grpc.aio
import structlog
from frequenz.api.dispatch.v1 import dispatch_pb2_grpc

from dispatchd.localapi.auth import Authenticator, AuthInterceptor
from dispatchd.localapi.broadcaster import Broadcaster
from dispatchd.localapi.decoding import DecodeGuardInterceptor
from dispatchd.localapi.service import DispatchService
from dispatchd.localapi.storage import Storage
from dispatchd.settings import LocalApiConfig, split_host_port

_log = structlog.get_logger(__name__)


def _is_loopback(listen: str) -> bool:
    """Whether only this host can reach ``listen`` (a wildcard or a name may be any host)."""
    host, _ = split_host_port(listen)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind_failure(listen: str) -> str:
    """Why gRPC could not bind, found by trying it with a plain socket.

    gRPC says only "Failed to bind" (its core logs the cause, but core logging
    is off so the log stays JSON), so ask the operating system the same question.
    """
    try:
        host, port = split_host_port(listen)
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    except (ValueError, OSError) as error:
        return f"cannot resolve the address: {error}"
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as error:
            return error.strerror or str(error)
    return "gRPC refused the address"


_SERVER_OPTIONS = [
    # Without this, gRPC sets SO_REUSEPORT and a second server would share the port.
    ("grpc.so_reuseport", 0),
    # Accept the HTTP/2 keepalive pings of frequenz-client-base (every 60 s by default,
    # also with no call open). gRPC's server default wants 5 min between pings without
    # data, and answers the third early one with GOAWAY "too_many_pings": an idle
    # stream (the daemon's) was dropped every 3 min and had to reconnect and re-list.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


class LocalApiServer:
    """``MicrogridDispatchService`` on ``listen``, dispatches kept in ``database``.

    With ``auth_keys`` only calls carrying one of them as ``key`` metadata are
    served; with ``sign_secret`` calls must also carry a valid HMAC signature.
    """

    def __init__(
        self,
        *,
        listen: str,
        database: pathlib.Path,
        auth_keys: Sequence[str] = (),
        sign_secret: str = "",
    ) -> None:
        self._listen = listen
        self._database = database
        self._authenticator = Authenticator(auth_keys=auth_keys, sign_secret=sign_secret)
        self.broadcaster = Broadcaster()
        """The event fan-out (exposed so embedders and tests can observe streams)."""
        self._server: grpc.aio.Server | None = None
        self._storage: Storage | None = None
        self._stopped = asyncio.Event()

    @classmethod
    def from_config(cls, local: LocalApiConfig) -> LocalApiServer:
        """The server ``[api.local]`` describes (``dispatchd api`` and the embedded one)."""
        local.database.parent.mkdir(parents=True, exist_ok=True)
        return cls(
            listen=local.listen,
            database=local.database,
            auth_keys=[key.get_secret_value() for key in local.auth_keys],
            sign_secret=local.sign_secret.get_secret_value() if local.sign_secret else "",
        )

    async def start(self) -> int:
        """Open the database and bind; returns the bound port (``:0`` picks a free one)."""
        if self._server is not None:
            raise RuntimeError("LocalApiServer already started")
        storage = Storage(self._database)
        interceptors: list[grpc.aio.ServerInterceptor] = [DecodeGuardInterceptor()]  # type: ignore[type-arg]
        if self._authenticator.enabled:
            interceptors.append(AuthInterceptor(self._authenticator))
        server = grpc.aio.server(interceptors=interceptors, options=_SERVER_OPTIONS)
        dispatch_pb2_grpc.add_MicrogridDispatchServiceServicer_to_server(
            DispatchService(storage, self.broadcaster), server
        )
        try:
            port = server.add_insecure_port(self._listen)
        except RuntimeError:
            port = 0
        if port == 0:
            storage.close()
            raise OSError(f"cannot listen on {self._listen}: {_bind_failure(self._listen)}")
        await server.start()
        self._server = server
        self._storage = storage
        self._stopped.clear()
        _log.info("local dispatch API listening", listen=self._listen, port=port)
        if not self._authenticator.enabled and not _is_loopback(self._listen):
            _log.warning(
                "local dispatch API accepts calls from other hosts without a key: "
                "set api.local.auth_keys, or listen on 127.0.0.1",
                listen=self._listen,
            )
        return port

    async def stop(self, grace: float | None = None) -> None:
        """End the streams, stop serving (waiting ``grace`` seconds for calls), close the DB."""
        server, storage = self._server, self._storage
        if server is None or storage is None:
            return
        self._server = None
        self._storage = None
        self.broadcaster.close_all()
        await server.stop(grace)
        storage.close()
        self._stopped.set()
        _log.info("local dispatch API stopped")

    async def wait_closed(self) -> None:
        """Return once :meth:`stop` has finished."""
        await self._stopped.wait()

"""An asyncio TCP proxy for tests that need to break a connection on purpose.

The proxy listens on a free loopback port and forwards every accepted
connection to ``target``. Tests point a client at ``proxy.port`` and then:

- ``cut()`` aborts every open connection (both sides see a reset) and keeps
  accepting new ones;
- ``refuse()`` cuts and also stops listening, so new connections are refused,
  until ``accept()`` listens again on the same port;
- ``pause()`` keeps connections open but holds back what the target sends
  (a broker that stops answering), until ``resume()`` lets it through.

Usage::

    async with TcpProxy("127.0.0.1", 5672) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        ...
        await proxy.refuse()
        ...
        await proxy.accept()
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from types import TracebackType


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TcpProxy:
    """Forwards loopback connections to a target and can cut or refuse them."""

    def __init__(self, target_host: str, target_port: int, *, port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = port
        self.connections_accepted = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._connected = asyncio.Condition()
        self._downstream_flowing = asyncio.Event()
        self._downstream_flowing.set()

    async def __aenter__(self) -> TcpProxy:
        await self.accept()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def open_connections(self) -> int:
        """Client connections currently forwarded (two writers per connection)."""
        return len(self._writers) // 2

    async def accept(self) -> None:
        """Listen (again) on ``self.port``; the first call picks a free port when it is 0."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def cut(self) -> None:
        """Abort every open connection; keep listening."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        pipes = list(self._pipes)
        for pipe in pipes:
            pipe.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)

    async def refuse(self) -> None:
        """Stop listening and abort every open connection: clients see resets and refusals."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        await self.cut()

    async def close(self) -> None:
        await self.refuse()

    def pause(self) -> None:
        """Hold back every byte from the target to the clients (requests still go through)."""
        self._downstream_flowing.clear()

    def resume(self) -> None:
        """Deliver what was held back, and everything after it."""
        self._downstream_flowing.set()

    async def wait_connections(self, count: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until at least ``count`` connections were accepted in total."""
        async with asyncio.timeout(timeout), self._connected:
            await self._connected.wait_for(lambda: self.connections_accepted >= count)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        if self._server is None:  # refused while connecting upstream
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        pipes = (
            asyncio.create_task(self._pipe(reader, up_writer, writer, downstream=False)),
            asyncio.create_task(self._pipe(up_reader, writer, up_writer, downstream=True)),
        )
        self._pipes.update(pipes)
        for pipe in pipes:
            pipe.add_done_callback(self._pipes.discard)
        async with self._connected:
            self.connections_accepted += 1
            self._connected.notify_all()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: asyncio.StreamWriter,
        *,
        downstream: bool,
    ) -> None:
        """Copy one direction; when it ends, end the other direction too."""
        try:
            while data := await reader.read(65536):
                if downstream:
                    await self._downstream_flowing.wait()
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for side in (writer, peer):
                self._writers.discard(side)
                with contextlib.suppress(Exception):
                    side.transport.abort()

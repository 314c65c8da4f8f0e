"""Benchmark of the local dispatch API (plain script; prints figures).

The server runs in its own process (as ``dispatchd api`` would); the clients,
including the 50 stream readers, share this process and its event loop.

    python bench/bench_localapi.py [--dispatches 10000] [--streams 50] [--rounds 100]
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta

import grpc
import structlog
from frequenz.api.common.v1alpha8.pagination.pagination_params_pb2 import PaginationParams
from frequenz.api.dispatch.v1 import dispatch_pb2_grpc
from frequenz.api.dispatch.v1.dispatch_pb2 import (
    ListMicrogridDispatchesRequest,
    StreamMicrogridDispatchesRequest,
)
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.types import TargetIds

MG = MicrogridId(1)
FANOUT_MG = MicrogridId(2)


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return f"p50 {pick(0.5):.2f} ms, p99 {pick(0.99):.2f} ms, max {ordered[-1] * 1000:.2f} ms"


def client_for(port: int) -> DispatchApiClient:
    return DispatchApiClient(server_url=f"grpc://127.0.0.1:{port}?ssl=false", auth_key="bench")


async def bench_creates(port: int, total: int, concurrency: int) -> float:
    """Creates per second with ``concurrency`` callers sharing the work."""
    clients = [client_for(port) for _ in range(concurrency)]
    start_time = datetime.now(UTC) + timedelta(days=1)

    async def worker(client: DispatchApiClient, count: int, offset: int) -> None:
        for n in range(count):
            await client.create(
                MG, f"bench-{offset}-{n}", start_time, timedelta(minutes=5), TargetIds(n % 50)
            )

    share = total // concurrency
    began = time.perf_counter()
    await asyncio.gather(*(worker(c, share, i) for i, c in enumerate(clients)))
    elapsed = time.perf_counter() - began
    for client in clients:
        await client.disconnect()
    return share * concurrency / elapsed


async def bench_list(port: int, page_size: int) -> tuple[float, list[float], int]:
    """Full listing time through all pages, and first-page latencies."""
    client = client_for(port)
    began = time.perf_counter()
    count = 0
    async for page in client.list(MG, page_size=page_size):
        count += sum(1 for _ in page)
    full = time.perf_counter() - began
    firsts = []
    request = ListMicrogridDispatchesRequest(
        microgrid_id=int(MG), pagination_params=PaginationParams(page_size=page_size)
    )
    for _ in range(50):
        began = time.perf_counter()
        await client.stub.ListMicrogridDispatches(request)
        firsts.append(time.perf_counter() - began)
    await client.disconnect()
    return full, firsts, count


SERVER_CODE = """
import asyncio, pathlib, sys, structlog
from dispatchd.localapi import LocalApiServer
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
async def main():
    server = LocalApiServer(listen="127.0.0.1:0", database=pathlib.Path(sys.argv[1]))
    print(await server.start(), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)
asyncio.run(main())
"""


async def bench_fanout(port: int, streams: int, rounds: int) -> tuple[list[float], list[float]]:
    """Latency from create (returned / called) to each of ``streams`` receiving it."""
    received: dict[int, list[float]] = {}
    expected = streams
    all_in: dict[int, asyncio.Event] = {}
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = dispatch_pb2_grpc.MicrogridDispatchServiceStub(channel)

    async def reader() -> None:
        call = stub.StreamMicrogridDispatches(
            StreamMicrogridDispatchesRequest(microgrid_id=int(FANOUT_MG))
        )
        async for response in call:
            now = time.perf_counter()
            dispatch_id = response.dispatch.metadata.dispatch_id
            arrivals = received.setdefault(dispatch_id, [])
            arrivals.append(now)
            if len(arrivals) == expected:
                all_in.setdefault(dispatch_id, asyncio.Event()).set()

    readers = [asyncio.create_task(reader()) for _ in range(streams)]
    client = client_for(port)
    start_time = datetime.now(UTC) + timedelta(days=1)
    # Streams only see events after they subscribed: probe until all of them see one.
    while True:
        probe = await client.create(FANOUT_MG, "probe", start_time, None, TargetIds(1))
        ready = all_in.setdefault(int(probe.id), asyncio.Event())
        try:
            await asyncio.wait_for(ready.wait(), 0.5)
            break
        except TimeoutError:
            continue
    after_return: list[float] = []
    after_call: list[float] = []
    for n in range(rounds):
        called = time.perf_counter()
        created = await client.create(FANOUT_MG, f"fan-{n}", start_time, None, TargetIds(1))
        returned = time.perf_counter()
        dispatch_id = int(created.id)
        await asyncio.wait_for(all_in.setdefault(dispatch_id, asyncio.Event()).wait(), 30)
        after_return += [max(0.0, t - returned) for t in received[dispatch_id]]
        after_call += [t - called for t in received[dispatch_id]]
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    await client.disconnect()
    await channel.close()
    return after_return, after_call


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dispatches", type=int, default=10_000)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))

    with tempfile.TemporaryDirectory() as directory:
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SERVER_CODE,
            str(pathlib.Path(directory) / "bench.sqlite3"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert server.stdout is not None and server.stdin is not None
        port = int((await server.stdout.readline()).decode())
        try:
            sequential = await bench_creates(port, 1000, 1)
            print(f"creates/s, 1 client sequential:      {sequential:8.0f}")
            concurrent = await bench_creates(port, args.dispatches - 1000, 8)
            print(f"creates/s, 8 clients concurrently:   {concurrent:8.0f}")

            for page_size in (100, 1000):
                full, firsts, count = await bench_list(port, page_size)
                print(
                    f"list {count} dispatches, page_size {page_size}: full listing "
                    f"{full * 1000:.0f} ms; first page {percentiles(firsts)}"
                )

            after_return, after_call = await bench_fanout(port, args.streams, args.rounds)
            print(
                f"fan-out to {args.streams} streams ({args.rounds} creates), from create "
                f"returning: {percentiles(after_return)}"
            )
            print(f"  from create being called: {percentiles(after_call)}")
        finally:
            server.stdin.close()
            await server.wait()


if __name__ == "__main__":
    asyncio.run(main())

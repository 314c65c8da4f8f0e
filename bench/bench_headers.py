"""First sync against an API that sends a stream's headers only with its first event.

Run: ``python bench/bench_headers.py [--dispatches 1000] [--rounds 5]``.

A real gRPC server on loopback (the tests' ``ScriptedApi`` with
``headers_on_first_event``, as frequenz-client-dispatch's FakeService
behaves, and for comparison one that sends them at once) holds
``--dispatches`` dispatches; one ``ApiSync`` syncs them. Printed: the time
from starting the sync until its first listing is handed over (the daemon's
ready), the median of ``--rounds``, and the listings made (a second one
confirms the stream once its headers come).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
from frequenz.client.dispatch import DispatchApiClient

from dispatchd.apisync import ApiSync, SyncItem
from tests.shell.daemon_harness import MG
from tests.shell.scripted_api import ScriptedApi, dispatch_pb


async def one_round(count: int, late_headers: bool) -> tuple[float, int]:
    async with ScriptedApi(headers_on_first_event=late_headers) as api:
        start = datetime.now(UTC) + timedelta(days=1)
        for n in range(1, count + 1):
            api.put(dispatch_pb(n, "BENCH", start + timedelta(seconds=n), timedelta(minutes=1)))
        client = DispatchApiClient(server_url=api.url, auth_key="bench")

        async def deliver(_: SyncItem) -> None:
            return None

        sync = ApiSync(client, MG, deliver)
        began = time.perf_counter()
        task = asyncio.create_task(sync.run())
        try:
            await asyncio.wait_for(sync.synced.wait(), 60)
            return time.perf_counter() - began, api.listings
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.disconnect()


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--dispatches", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()}", flush=True)
    for late in (True, False):
        results = [await one_round(args.dispatches, late) for _ in range(args.rounds)]
        seconds = statistics.median(r[0] for r in results)
        name = "headers with the first event" if late else "headers at once"
        print(
            f"{args.dispatches} dispatches, {name}: synced after {seconds * 1e3:.0f} ms "
            f"(median of {args.rounds}; target < 500 ms)",
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(main())

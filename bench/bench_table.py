"""The scale targets' table, measured now: frequenz-dispatch 1.0.4 beside dispatchd, alternating.

Run: ``python bench/bench_table.py --anchor-python .anchor/bin/python [--rounds 2]
[--seconds 70] [--sizes 10000 50000] [--anchor-sizes 10000] [--minutely 10000]``
(about 7 minutes a round).

The absolute targets (docs/capacity.md, "Beside frequenz-dispatch") were
set from the anchor's figures on the machine of one day (3.4 CPU-s, 37 ms);
this machine's speed drifts by a factor of two between days, the anchor's
with it. So each round runs both on the same workload one after the other
(the order swapped every round), and the table gives both, their ratio, and
each target as a ratio of the anchor's figure it was set from: a ratio
measured side by side carries over between machines, an absolute figure
does not. The anchor's first list of 50k takes it many minutes here, so it
is measured only at ``--anchor-sizes``.

The workloads are ``bench_memory.py``'s (RSS at ready after a first sync of
one-off dispatches, dispatchd with its embedded local API, the anchor
against ``dispatchd api`` in its own process) and ``bench_minutely.py``'s
(10k MINUTELY dispatches, 70 s; dispatchd publishes every transition with
confirms and its lag is stamped at an aiormq consumer, ``--lean``; the
anchor's lag is stamped in its own process, nothing published). The venv
for ``--anchor-python`` is made as ``bench_anchor.py`` says.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_anchor
import bench_memory
import bench_minutely

# The issue's anchor figures (one run, on the day it was filed) and its targets.
ISSUE = {
    "50k": {"anchor": 136.0, "target": 136.0},
    "50k peak": {"anchor": 136.0, "target": 160.0},
    "10k": {"anchor": 73.0, "target": 73.0},
    "10k apart": {"anchor": 73.0, "target": 73.0},
    "cpu": {"anchor": 3.4, "target": 4.5},
    "p99": {"anchor": 37.0, "target": 50.0},
}


def rows(args: argparse.Namespace) -> dict[str, str]:
    """Row key -> its name in the table, in the issue's order."""
    named = {}
    for size in sorted(args.sizes, reverse=True):
        key = f"{size // 1000}k"
        named[key] = f"RSS after the first sync of {key} (MiB)"
        named[f"{key} peak"] = f"peak RSS up to then, {key} (MiB)"
        if size in args.anchor_sizes:
            named[f"{key} apart"] = (
                f"RSS after the first sync of {key}, dispatchd's API in its own process"
                " as the library's (MiB)"
            )
    if args.minutely:
        named["cpu"] = f"CPU over {args.seconds:g} s, {args.minutely // 1000}k MINUTELY (CPU-s)"
        named["p99"] = "start lag p99 in that window (ms)"
    return named


def minutely_args(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(
        amqp_url=args.amqp_url,
        dispatches=args.minutely,
        seconds=args.seconds,
        duration=30,
        profile="",
        no_ceiling=True,
        lean=True,
    )


async def one_round(
    args: argparse.Namespace, number: int, figures: dict[str, dict[str, list[float]]]
) -> None:
    def keep(who: str, row: str, value: float | None) -> None:
        if value is not None:
            figures[row].setdefault(who, []).append(value)

    async def ours_memory(size: int) -> None:
        result = await bench_memory.measure(args.amqp_url, size, separate_api=False)
        key = f"{size // 1000}k"
        keep("dispatchd", key, result.get("ready"))
        keep("dispatchd", f"{key} peak", result.get("peak"))
        if size in args.anchor_sizes:
            apart = await bench_memory.measure(args.amqp_url, size, separate_api=True)
            keep("dispatchd", f"{key} apart", apart.get("ready"))

    async def anchor_memory(size: int) -> None:
        result = await bench_anchor.memory(args.anchor_python, size, args.within)
        key = f"{size // 1000}k"
        keep("anchor", key, result["ready"] if result else None)
        keep("anchor", f"{key} peak", result["peak"] if result else None)
        keep("anchor", f"{key} apart", result["ready"] if result else None)

    async def ours_minutely() -> None:
        result = await bench_minutely.bench(minutely_args(args))
        keep("dispatchd", "cpu", result["cpu"])
        keep("dispatchd", "p99", result["p99"])

    async def anchor_minutely() -> None:
        result = await bench_anchor.minutely(
            args.anchor_python, args.minutely, args.seconds, args.within
        )
        keep("anchor", "cpu", result["cpu"])
        keep("anchor", "p99", result["p99"])

    pairs: list[tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]] = []

    async def nothing() -> None:
        return None

    for size in args.sizes:
        anchor = functools.partial(anchor_memory, size) if size in args.anchor_sizes else nothing
        pairs.append((functools.partial(ours_memory, size), anchor))
    if args.minutely:
        pairs.append((ours_minutely, anchor_minutely))
    print(f"\n-- round {number}", flush=True)
    for ours, anchor in pairs:
        first, second = (ours, anchor) if number % 2 else (anchor, ours)
        await first()
        await second()


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{min(values):.1f} to {max(values):.1f}"


def table(
    named: dict[str, str], figures: dict[str, dict[str, list[float]]], issue_window: bool
) -> None:
    """The table; the CPU and lag targets only where the window is the issue's (10k, 70 s)."""
    print(
        "\n| figure | frequenz-dispatch 1.0.4 | dispatchd | dispatchd / anchor (median) "
        "| target | target / the issue's anchor |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for row, name in named.items():
        anchor = figures[row].get("anchor", [])
        ours = figures[row].get("dispatchd", [])
        if not anchor and not ours:
            continue
        ratios = [o / a for o, a in zip(ours, anchor, strict=False) if a]
        ratio = f"{statistics.median(ratios):.2f}" if ratios else "-"
        issue = ISSUE.get(row) if issue_window or row not in ("cpu", "p99") else None
        targets = "- | -"
        if issue:
            targets = f"≤ {issue['target']:g} | ≤ {issue['target'] / issue['anchor']:.2f}"
        print(f"| {name} | {spread(anchor)} | {spread(ours)} | {ratio} | {targets} |")


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--anchor-python", required=True, help="python of a venv with frequenz-dispatch 1.0.4"
    )
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10000, 50000])
    parser.add_argument(
        "--anchor-sizes",
        type=int,
        nargs="*",
        default=[10000],
        help="sizes the anchor's first list is measured at (at 50k it takes it many minutes)",
    )
    parser.add_argument("--minutely", type=int, default=10000, help="0 skips it")
    parser.add_argument("--seconds", type=float, default=70.0)
    parser.add_argument(
        "--within", type=float, default=900.0, help="seconds the anchor's first list may take"
    )
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()}", flush=True)
    named = rows(args)
    figures: dict[str, dict[str, list[float]]] = {row: {} for row in named}
    for number in range(1, args.rounds + 1):
        await one_round(args, number, figures)
    print(f"\nload average at the end: {os.getloadavg()}", flush=True)
    table(named, figures, (args.minutely, args.seconds) == (10000, 70.0))


if __name__ == "__main__":
    asyncio.run(main())

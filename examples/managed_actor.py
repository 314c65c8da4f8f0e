"""A managed actor: started, reconfigured and stopped with the dispatches of one type.

The dispatcher builds a ``PeakShavingActor`` when a dispatch of the type
starts running, sends it every change while it runs and stops it when the
dispatch stops (``Dispatcher.start_managing``, as in ``frequenz.dispatch``).
Run against a running dispatchd::

    python examples/managed_actor.py --microgrid 1 \
        --amqp-url amqp://guest:guest@localhost/ --type PEAK_SHAVING

It prints one line per start, reconfiguration and stop. ``--count`` exits
after that many lines and ``--timeout`` after that many seconds (exit status
1), so scripts and tests can run it. ``examples/test_managed_actor.py`` unit
tests the same actor with ``dispatchd.client.testing.FakeDispatcher``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from datetime import timedelta

from frequenz.channels import Receiver

from dispatchd.client import Dispatcher, DispatchInfo, MergeByTypeTarget

Report = Callable[[str], None]


class PeakShavingActor:
    """Stands in for a real actor: keeps the dispatch's settings and says what it does."""

    def __init__(
        self, info: DispatchInfo, updates: Receiver[DispatchInfo], report: Report = print
    ) -> None:
        """Take the first settings; ``updates`` brings the later ones."""
        self.settings = info
        self.running = False
        self._updates = updates
        self._report = report
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def new(
        cls, info: DispatchInfo, updates: Receiver[DispatchInfo], report: Report = print
    ) -> PeakShavingActor:
        """The factory ``start_managing`` calls (it may await set-up work)."""
        return cls(info, updates, report)

    def start(self) -> None:
        """Begin: apply the settings, then follow the updates."""
        self.running = True
        self._say("started")
        self._task = asyncio.create_task(self._follow_updates())

    async def stop(self, msg: str | None = None) -> None:
        """Stop working (the dispatch stopped, or the dispatcher did)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.running = False
        self._report(f"stopped target={self.settings.target}")

    async def _follow_updates(self) -> None:
        async for info in self._updates:
            self.settings = info
            self._say("reconfigured")

    def _say(self, what: str) -> None:
        settings = self.settings
        until = settings.until.isoformat() if settings.until else None
        self._report(
            f"{what} target={settings.target} options={settings.options} "
            f"dry_run={settings.dry_run} until={until}"
        )


class Lines:
    """Prints lines and says when enough were printed."""

    def __init__(self, count: int | None) -> None:
        self.enough = asyncio.Event()
        self._left = count

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        if self._left is not None:
            self._left -= 1
            if self._left <= 0:
                self.enough.set()


async def run(args: argparse.Namespace) -> int:
    lines = Lines(args.count)

    async def factory(info: DispatchInfo, updates: Receiver[DispatchInfo]) -> PeakShavingActor:
        return await PeakShavingActor.new(info, updates, report=lines)

    async with Dispatcher(args.microgrid, args.amqp_url, exchange=args.exchange) as dispatcher:
        await dispatcher.start_managing(
            args.type,
            actor_factory=factory,
            merge_strategy=MergeByTypeTarget() if args.merge else None,
            retry_interval=timedelta(seconds=args.retry),
        )
        print(f"ready microgrid={args.microgrid} type={args.type}", flush=True)
        await lines.enough.wait()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--microgrid", type=int, required=True)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@localhost/")
    parser.add_argument("--exchange", default="dispatch")
    parser.add_argument("--type", default="PEAK_SHAVING", help="the dispatch type to manage")
    parser.add_argument("--merge", action="store_true", help="one actor per type and target")
    parser.add_argument("--retry", type=float, default=60.0, help="seconds between start retries")
    parser.add_argument("--count", type=int, help="exit after this many lines")
    parser.add_argument("--timeout", type=float, help="exit (status 1) after this many seconds")
    args = parser.parse_args()
    try:
        return asyncio.run(asyncio.wait_for(run(args), args.timeout))
    except TimeoutError:
        print("timeout", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # Ctrl-C is how people stop it: no traceback
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""An actor that starts and stops with the dispatches of one type.

Run against a running dispatchd::

    python examples/running_state_actor.py --microgrid 1 \
        --amqp-url amqp://guest:guest@localhost/ --type DEMO_TYPE

It prints one line per running-state change. ``--count`` exits after that
many changes and ``--timeout`` after that many seconds (exit status 1), so
scripts and tests can run it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from dispatchd.client import Dispatch, Dispatcher, MergeByType, RunningState


class DemoActor:
    """Stands in for a real actor: it only says what it would do."""

    def start_or_reconfigure(self, dispatch: Dispatch) -> None:
        print(
            f"RUNNING id={dispatch.id} type={dispatch.type} target={dispatch.selector} "
            f"payload={dict(dispatch.payload)} dry_run={dispatch.dry_run} "
            f"until={dispatch.until.isoformat() if dispatch.until else None}",
            flush=True,
        )

    def stop(self, dispatch: Dispatch) -> None:
        print(f"STOPPED id={dispatch.id} type={dispatch.type}", flush=True)


async def run(args: argparse.Namespace) -> int:
    actor = DemoActor()
    async with Dispatcher(args.microgrid, args.amqp_url, exchange=args.exchange) as dispatcher:
        receiver = await dispatcher.new_running_state_event_receiver(
            args.type, merge_strategy=MergeByType() if args.merge else None
        )
        print(f"ready microgrid={args.microgrid} type={args.type}", flush=True)
        seen = 0
        async for dispatch in receiver:
            match dispatch.running(args.type):
                case RunningState.RUNNING:
                    actor.start_or_reconfigure(dispatch)
                case RunningState.STOPPED:
                    actor.stop(dispatch)
                case RunningState.DIFFERENT_TYPE:
                    continue
            seen += 1
            if args.count is not None and seen >= args.count:
                break
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--microgrid", type=int, required=True)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@localhost/")
    parser.add_argument("--exchange", default="dispatch")
    parser.add_argument("--type", default="DEMO_TYPE", help="the dispatch type this actor runs")
    parser.add_argument("--merge", action="store_true", help="merge intervals by type")
    parser.add_argument("--count", type=int, help="exit after this many changes")
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

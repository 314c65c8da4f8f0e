"""Print every dispatch created, updated or deleted on one microgrid.

Run against a running dispatchd::

    python examples/lifecycle_printer.py --microgrid 1 --amqp-url amqp://guest:guest@localhost/

``--count`` exits after that many events and ``--timeout`` after that many
seconds (exit status 1), so scripts and tests can run it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from dispatchd.client import Created, Deleted, Dispatcher, Updated


async def run(args: argparse.Namespace) -> int:
    async with Dispatcher(args.microgrid, args.amqp_url, exchange=args.exchange) as dispatcher:
        receiver = dispatcher.lifecycle_events.new_receiver()
        print(f"ready microgrid={args.microgrid}", flush=True)
        seen = 0
        async for event in receiver:
            match event:
                case Created(dispatch):
                    print(f"created id={dispatch.id} type={dispatch.type}", flush=True)
                case Updated(dispatch):
                    print(
                        f"updated id={dispatch.id} type={dispatch.type} "
                        f"payload={dict(dispatch.payload)}",
                        flush=True,
                    )
                case Deleted(dispatch):
                    print(f"deleted id={dispatch.id} type={dispatch.type}", flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                break
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--microgrid", type=int, required=True)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@localhost/")
    parser.add_argument("--exchange", default="dispatch")
    parser.add_argument("--count", type=int, help="exit after this many events")
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

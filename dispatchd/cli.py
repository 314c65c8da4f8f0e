"""The ``dispatchd`` command line: parse, load the configuration, hand over to a command module.

Exit codes (README.md, Commands): 0 done, 2 bad configuration or arguments, 1 any
other failure. Expected errors are one line on stderr, never a traceback.

Each command's module is imported when that command runs, so ``check-config``
never loads gRPC, aio-pika or the protobuf bindings:

- ``run``: ``dispatchd.handoff.main``, which runs ``dispatchd.daemon.main`` in a
  process image that never loads the configuration machinery (pydantic)
- ``schedule``: ``dispatchd.schedule.main``
- ``tail``: ``dispatchd.tail.main``
- ``cluster status``: ``dispatchd.clusterstatus.main``
- ``api``: ``dispatchd.localapi.server.LocalApiServer``, driven from here
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from dispatchd.core.times import utc
from dispatchd.settings import MASK, MIN_SECRET_LENGTH, ConfigError, Settings, redact_urls

if TYPE_CHECKING:
    from dispatchd.localapi.server import LocalApiServer

__all__ = ["build_parser", "exit_code", "main", "render_toml"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
SCHEDULE_LIMIT = 1000
"""``schedule`` rows unless ``--limit`` says otherwise (a minutely rule fills a day with 1440)."""

_CONFIG_HELP = (
    "TOML configuration file (default: $DISPATCHD_CONFIG, else built-in defaults); "
    "DISPATCHD_* environment variables override it"
)


class _UsageError(Exception):
    """A bad argument value found after parsing; reported like argparse's own errors."""


class _PrintVersion(argparse.Action):
    """``--version``, looking the version up only when asked (``run`` starts faster)."""

    def __init__(self, option_strings: Sequence[str], dest: str) -> None:
        super().__init__(
            option_strings,
            dest=argparse.SUPPRESS,
            default=argparse.SUPPRESS,
            nargs=0,
            help="show the version and exit",
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        from dispatchd import __version__

        print(f"dispatchd {__version__}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The full parser, public so tests and docs can walk the commands."""
    parser = argparse.ArgumentParser(
        prog="dispatchd",
        description=(
            "Sync dispatches from the Frequenz Dispatch API, schedule them and publish "
            "their lifecycle and running state to a RabbitMQ topic exchange."
        ),
        epilog="Exit codes: 0 done, 2 bad configuration or arguments, 1 any other failure.",
    )
    parser.add_argument("--version", action=_PrintVersion)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=description)
        sub.add_argument("--config", metavar="FILE", type=Path, help=_CONFIG_HELP)
        return sub

    command(
        "run",
        "run the daemon",
        "Run the daemon: sync every configured microgrid, schedule its dispatches, "
        "publish lifecycle and running messages, serve the snapshot RPC, /metrics, "
        "/livez and /readyz, until SIGTERM or SIGINT; then stop gracefully within "
        "shutdown_timeout. With api.url unset it also starts the embedded local API. "
        "Once the configuration is checked, the process goes on (same pid) as "
        "'python -m dispatchd.handoff', which never loads the configuration libraries.",
    )
    check = command(
        "check-config",
        "validate the configuration and print it",
        "Load and validate the configuration and print the effective values with "
        "secrets masked (exit 0), or print every problem as 'key: message' (exit 2). "
        "That includes what would make 'run' fail at start and can be known without a "
        "network: an amq.* exchange, http.listen on the embedded API's address, a "
        "state.dir that is a file or not writable, api.url without an auth key.",
    )
    check.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    command(
        "api",
        "serve only the local dispatch API",
        "Serve only the local dispatch API (MicrogridDispatchService on SQLite) on "
        "api.local.listen, for docker compose and development, until SIGTERM or SIGINT.",
    )
    schedule = command(
        "schedule",
        "print the occurrences in a time window",
        "Print the occurrences (start, end, dispatch id, type) the daemon would run "
        "for one microgrid in a time window, computed by the daemon's own code.",
    )
    schedule.add_argument(
        "--microgrid", metavar="ID", type=_positive_int, required=True, help="microgrid id"
    )
    schedule.add_argument(
        "--from",
        dest="start",
        metavar="TIME",
        type=_timestamp,
        help="window start, ISO 8601 (naive times are UTC) or 'now' (default: now)",
    )
    schedule.add_argument(
        "--to",
        dest="end",
        metavar="TIME",
        type=_timestamp,
        help="window end, ISO 8601 or 'now' (default: 24 hours after the start)",
    )
    schedule.add_argument(
        "--type", dest="dispatch_type", metavar="T", help="only dispatches of this type"
    )
    schedule.add_argument(
        "--limit",
        metavar="N",
        type=_positive_int,
        default=SCHEDULE_LIMIT,
        help=f"print at most N occurrences and say when more were cut (default: {SCHEDULE_LIMIT})",
    )
    tail = command(
        "tail",
        "print every message on the exchange",
        "Subscribe to the exchange and print every message, one line each, readable "
        "by people. Stop with Ctrl-C.",
    )
    tail.add_argument(
        "--bind",
        metavar="KEY",
        action="append",
        default=[],
        dest="bindings",
        help="binding key, repeatable (default: '#', everything)",
    )
    tail.add_argument("--json", action="store_true", help="print the raw JSON bodies")
    cluster = commands.add_parser(
        "cluster",
        help="inspect a cluster of replicas (PostgreSQL state.url)",
        description="Inspect a cluster of replicas sharing one PostgreSQL database "
        "(state.url); see docs/replicas.md.",
    )
    cluster_commands = cluster.add_subparsers(
        dest="cluster_command", metavar="SUBCOMMAND", required=True
    )
    status = cluster_commands.add_parser(
        "status",
        help="print the replicas and every microgrid lease",
        description="Print, from the database, every replica (live or gone, heartbeat "
        "age, microgrids owned, version) and every microgrid lease (owner, term, when it "
        "expires, previous owner), timed by the database's clock. Reads only. Needs "
        "state.url; exits 2 without it, 1 when the database cannot be read.",
    )
    status.add_argument("--config", metavar="FILE", type=Path, help=_CONFIG_HELP)
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _timestamp(text: str) -> datetime:
    if text == "now":
        return datetime.now(UTC)
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time like 2026-05-01T12:00:00+02:00, got {text!r}"
        ) from None
    return utc(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dispatchd`` script and ``python -m dispatchd``."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and argparse's own errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    name: str = args.command
    if name == "cluster":
        name = f"cluster {args.cluster_command}"
    from dispatchd.config import load_config, local_problems

    settings: Settings | None = None
    try:
        settings = load_config(args.config)
        if name in _PREFLIGHT_COMMANDS and (problems := local_problems(settings)):
            raise ConfigError(problems)
        if name == "check-config":
            return _check_config(settings, as_json=args.json, out=sys.stdout)
        if name != "run":  # run's daemon process does this itself (dispatchd.handoff)
            _prepare_logging(settings)
        return _COMMANDS[name](settings, args)
    except BaseException as exc:  # exit_code raises again what it does not report
        return exit_code(name, exc, settings)


def _prepare_logging(settings: Settings) -> None:
    """gRPC's core quiet and logging configured, before the command's module is imported.

    So import-time library warnings already come out in the configured format.
    Imported here, not at the top: ``run``'s first process never logs, and
    structlog would cost it 50 ms of start-up.
    """
    from dispatchd.logs import configure_from_settings, quiet_grpc_core

    quiet_grpc_core()
    configure_from_settings(settings)


def exit_code(name: str, exc: BaseException, settings: Settings | None) -> int:
    """Report a command's failure as one line on stderr, never a traceback; its exit code.

    ``SystemExit`` and other non-errors are raised again.
    """
    if isinstance(exc, ConfigError):
        for key, message in exc.problems:
            print(_redacted(f"{key}: {message}", settings), file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, _UsageError):
        print(f"dispatchd {name}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_OK
    if isinstance(exc, Exception):
        line = f"dispatchd {name}: {type(exc).__name__}: {exc}"
        print(_redacted(line, settings), file=sys.stderr)
        return EXIT_FAILURE
    raise exc


_PREFLIGHT_COMMANDS = frozenset({"check-config", "run"})
"""Commands that refuse what :func:`local_problems` finds (``run`` would fail on it)."""


def _redacted(line: str, settings: Settings | None) -> str:
    """An error line with URL passwords and every configured secret masked."""
    line = redact_urls(line)
    secrets = settings.secret_values() if settings is not None else []
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= MIN_SECRET_LENGTH:
            line = line.replace(secret, MASK)
    return line


def _check_config(settings: Settings, *, as_json: bool, out: TextIO) -> int:
    from dispatchd.config import effective_config

    values = effective_config(settings)
    if as_json:
        out.write(json.dumps(values, indent=2) + "\n")
    else:
        out.write("# effective dispatchd configuration; secrets are masked\n")
        if settings.embedded_api:
            out.write("# api.url is unset: the embedded local API (api.local) is used\n")
        out.write(render_toml(values))
    return EXIT_OK


def render_toml(values: dict[str, Any]) -> str:
    """Nested plain data (str, int, float, bool, lists of those, tables) as TOML."""
    lines: list[str] = []
    _render_table(values, [], lines)
    return "\n".join(lines) + "\n"


def _render_table(values: dict[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in values.items() if isinstance(v, dict)}
    if path and scalars:
        lines.append(f"\n[{'.'.join(path)}]")
    for key, value in scalars.items():
        lines.append(f"{key} = {_toml_value(value)}")
    for key, table in tables.items():
        _render_table(table, [*path, key], lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


# --------------------------------------------------------------------------- commands


def _run(settings: Settings, args: argparse.Namespace) -> int:
    from dispatchd import handoff

    return handoff.main(settings)


def _schedule(settings: Settings, args: argparse.Namespace) -> int:
    start: datetime = args.start or datetime.now(UTC)
    end: datetime = args.end or start + timedelta(days=1)
    if end <= start:
        raise _UsageError("--to must be after --from")
    from dispatchd import schedule

    return schedule.main(
        settings,
        microgrid_id=args.microgrid,
        start=start,
        end=end,
        dispatch_type=args.dispatch_type,
        limit=args.limit,
    )


def _tail(settings: Settings, args: argparse.Namespace) -> int:
    from dispatchd import tail

    return tail.main(settings, bindings=list(args.bindings) or ["#"], raw_json=args.json)


def _api(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    from dispatchd.localapi.server import LocalApiServer

    server = LocalApiServer.from_config(settings.api.local)
    return asyncio.run(_serve_until_signal(server, settings.shutdown_timeout))


async def _serve_until_signal(server: LocalApiServer, grace: float) -> int:
    import asyncio

    from dispatchd.logs import get_logger

    log = get_logger("dispatchd.api")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()  # logs the address it is listening on
    stopping = asyncio.ensure_future(stop.wait())
    closed = asyncio.ensure_future(server.wait_closed())
    await asyncio.wait({stopping, closed}, return_when=asyncio.FIRST_COMPLETED)
    if closed.done():
        stopping.cancel()
        log.error("local dispatch API stopped unexpectedly")
        return EXIT_FAILURE
    log.info("stopping local dispatch API", grace_seconds=grace)
    await server.stop(grace)
    with contextlib.suppress(asyncio.CancelledError):
        await closed
    return EXIT_OK


def _cluster_status(settings: Settings, args: argparse.Namespace) -> int:
    from dispatchd import clusterstatus

    return clusterstatus.main(settings, as_json=args.json)


_COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "run": _run,
    "api": _api,
    "schedule": _schedule,
    "tail": _tail,
    "cluster status": _cluster_status,
}

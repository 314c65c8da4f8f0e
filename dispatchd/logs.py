"""Logging: structlog for our code and the standard library's loggers, one renderer for both.

One event per line: JSON when stderr is not a terminal (production, Docker),
coloured key=value on a terminal, or forced by ``log.format``. aio-pika,
aiormq, grpc and asyncio log through the standard library; their records are
rendered by the same ``ProcessorFormatter``, so every line has one format. A
masking step runs last before rendering, so no secret reaches a log line: keys
that name secrets are replaced, passwords inside URLs are replaced, and the
configured secret values themselves are replaced wherever they occur.

gRPC's C core writes its own lines (``E1130 … add_port.cc:83] …``) straight
to stderr, around Python's logging; :func:`quiet_grpc_core` silences it
before grpc is imported. What it would have said reaches us anyway, in the
status details of the failed call or the exception, which our code logs.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from dispatchd.settings import MASK, MIN_SECRET_LENGTH, Settings, redact_urls

__all__ = [
    "MIN_SECRET_LENGTH",
    "LogFormat",
    "SecretMasker",
    "configure_from_settings",
    "configure_logging",
    "get_logger",
    "quiet_grpc_core",
    "reset_logging",
]

LogFormat = Literal["auto", "json", "console"]

_SECRET_KEY_PARTS = (
    "password",
    "passwd",
    "secret",
    "auth_key",
    "token",
    "authorization",
    "api_key",
    "credential",
)
_HANDLER_NAME = "dispatchd"


def _is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(part in lowered for part in _SECRET_KEY_PARTS)


class SecretMasker:
    """A structlog processor that masks secrets in every value of an event.

    Known secret values (from the configuration) shorter than four characters
    are not searched for in free text, since masking them would garble
    unrelated words; keys and URL passwords are masked regardless.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        known = {secret for secret in secrets if len(secret) >= MIN_SECRET_LENGTH}
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted(known, key=len, reverse=True)

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        return {key: self._value(key, value) for key, value in event_dict.items()}

    def _value(self, key: str, value: Any) -> Any:
        if key.startswith("_"):  # structlog's own bookkeeping (_record, _from_structlog)
            return value
        if _is_secret_key(key) and value not in (None, "", [], ()):
            return MASK
        return self._masked(value)

    def _masked(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._masked_text(value)
        if isinstance(value, Mapping):
            return {k: self._value(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._masked(item) for item in value)
        if isinstance(value, int | float | bool) or value is None:
            return value
        # Anything else is rendered through str() anyway; mask that text.
        return self._masked_text(str(value))

    def _masked_text(self, text: str) -> str:
        text = redact_urls(text)
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text


_LEADING_KEYS = ("timestamp", "level", "logger", "event")


def _leading_keys_first(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> EventDict:
    """Time, level, logger and event lead each JSON line, so people can scan them."""
    ordered = {key: event_dict[key] for key in _LEADING_KEYS if key in event_dict}
    ordered.update(event_dict)
    return ordered


def _use_json(log_format: LogFormat, stream: TextIO) -> bool:
    if log_format == "auto":
        isatty = getattr(stream, "isatty", None)
        return not (callable(isatty) and isatty())
    return log_format == "json"


def configure_logging(
    level: int | str = logging.INFO,
    log_format: LogFormat = "auto",
    *,
    stream: TextIO | None = None,
    secrets: Iterable[str] = (),
) -> None:
    """Route structlog and the standard library's loggers to one handler on ``stream``.

    Calling it again replaces the previous set-up (tests and the CLI rely on that).
    """
    out = sys.stderr if stream is None else stream
    as_json = _use_json(log_format, out)
    masker = SecretMasker(secrets)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.StackInfoRenderer(),
    ]
    # Tracebacks become a string field before masking, so they are masked too
    # (and, in JSON, stay on the event's one line).
    shared.append(structlog.processors.format_exc_info)
    renderer: Processor
    if as_json:
        renderer = structlog.processors.JSONRenderer()
    else:
        colors = bool(getattr(out, "isatty", lambda: False)())
        renderer = structlog.dev.ConsoleRenderer(colors=colors)

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            masker,
            _leading_keys_first,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)

    reset_logging()
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    # frequenz-client-common registers the "CID" id prefix twice, and
    # frequenz-core warns about it on every import; nothing an operator can act on.
    logging.getLogger("frequenz.core.id").setLevel(logging.ERROR)
    logging.captureWarnings(True)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def reset_logging() -> None:
    """Undo :func:`configure_logging` (for tests that configure logging on a buffer)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.setLevel(logging.WARNING)
    logging.getLogger("frequenz.core.id").setLevel(logging.NOTSET)
    structlog.reset_defaults()


def configure_from_settings(settings: Settings, *, stream: TextIO | None = None) -> None:
    """Logging as the configuration says, masking every configured secret."""
    configure_logging(
        settings.log.level,
        settings.log.format,
        stream=stream,
        secrets=settings.secret_values(),
    )


GRPC_CORE_QUIET = {"GRPC_VERBOSITY": "NONE"}
"""gRPC core's own logging off, unless the operator sets these variables themselves."""


def quiet_grpc_core(environ: MutableMapping[str, str] = os.environ) -> None:
    """Keep gRPC's C core from writing non-JSON lines to stderr.

    grpcio reads ``GRPC_VERBOSITY`` once, when ``grpc`` is first imported, so
    this must run before that (the CLI calls it first thing). An operator who
    sets ``GRPC_VERBOSITY`` (e.g. ``debug``, with ``GRPC_TRACE``) keeps it.
    """
    for name, value in GRPC_CORE_QUIET.items():
        environ.setdefault(name, value)


def get_logger(name: str | None = None, **initial: Any) -> structlog.stdlib.BoundLogger:
    """A bound logger; ``initial`` values (e.g. microgrid_id) go on every line."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger.bind(**initial) if initial else logger

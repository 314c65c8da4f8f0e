"""The settings the daemon runs with: frozen plain dataclasses, loaded by :mod:`dispatchd.config`.

They import nothing heavier than the standard library and ``annotated_types``,
so the daemon's process, which :mod:`dispatchd.handoff` starts with settings
already validated, never loads pydantic (about 12 MiB of a 70 MiB process).
Each field's rules sit beside it as ``Annotated`` metadata: bounds from
``annotated_types`` and :class:`Rule` checks, both applied by pydantic when
:mod:`dispatchd.config` validates a file and the environment into these classes.

Secrets are :class:`Secret` (or :class:`SecretUrl` for the AMQP URL) so that
printing or logging a settings object never shows them.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from annotated_types import Ge, Gt, Le, Len, MinLen

if TYPE_CHECKING:
    from pydantic import GetCoreSchemaHandler
    from pydantic_core import CoreSchema

__all__ = [
    "LOG_LEVELS",
    "MASK",
    "MIN_SECRET_LENGTH",
    "AmqpConfig",
    "ApiConfig",
    "ClusterConfig",
    "ConfigError",
    "HttpConfig",
    "LocalApiConfig",
    "LogConfig",
    "Rule",
    "Secret",
    "SecretDsn",
    "SecretUrl",
    "Settings",
    "StateConfig",
    "default_replica_id",
    "dsn_passwords",
    "mask_dsn",
    "mask_url",
    "redact_urls",
    "split_host_port",
]

MASK = "***"
MIN_SECRET_LENGTH = 4
"""Shorter configured secrets are not searched for in free text (they would garble it)."""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(Exception):
    """Every problem found while loading the configuration, as (key, message) pairs."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems: list[tuple[str, str]] = list(problems)
        super().__init__("; ".join(f"{key}: {message}" for key, message in self.problems))


# --------------------------------------------------------------------------- masking

_URL_WITH_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)(\S*)@")
_AMBIGUOUS_IN_USER = frozenset("/?#")
_PASSWORD_PARAMETER = re.compile(r"([?&]password=)[^&\s]*", re.IGNORECASE)


def _shown_userinfo(userinfo: str) -> str:
    """What may be shown of ``user:password``: the user name alone, never the rest."""
    user, colon, _ = userinfo.partition(":")
    if _AMBIGUOUS_IN_USER.intersection(user):
        return MASK  # not even the user name is certain: show nothing of it
    return f"{user}:{MASK}" if colon else userinfo


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***``, safe to print or log.

    Everything between ``://`` and the last ``@`` is user information, even
    when an unencoded ``/``, ``?`` or ``#`` in a password makes a URL parser
    end the host part early: a text-level rule cannot be fooled by the parse.
    """
    return redact_urls(url)


def redact_urls(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``.

    A URL runs to the next whitespace; within it the last ``@`` ends the
    user information, so more may be hidden than needed but never less.
    """
    return _URL_WITH_USERINFO.sub(
        lambda match: f"{match.group(1)}{_shown_userinfo(match.group(2))}@", text
    )


def mask_dsn(dsn: str) -> str:
    """A PostgreSQL URL with its password hidden, in the user information or the query."""
    return _PASSWORD_PARAMETER.sub(lambda match: f"{match.group(1)}{MASK}", mask_url(dsn))


def dsn_passwords(dsn: str) -> set[str]:
    """Every password in a PostgreSQL URL, as written and decoded (for masking logs)."""
    parts = urlsplit(dsn)
    found = {parts.password or ""}
    found.update(value for key, value in parse_qsl(parts.query) if key.lower() == "password")
    return {form for password in found if password for form in (password, unquote(password))}


class Secret:
    """A text that ``str``, ``repr`` and logs show as ``**********``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def _display(self) -> str:
        return "**********" if self._value else ""

    def __str__(self) -> str:
        return self._display()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._display()!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        return type(self), (self._value,)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[Any], handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        """Validated as text, then wrapped; called only by :mod:`dispatchd.config`."""
        from pydantic_core import core_schema

        return core_schema.no_info_before_validator_function(
            _secret_text,
            core_schema.no_info_after_validator_function(cls, core_schema.str_schema()),
        )


def _secret_text(value: Any) -> Any:
    return value.get_secret_value() if isinstance(value, Secret) else value


class SecretUrl(Secret):
    """A URL whose password is a secret: shown with the password as ``***``."""

    __slots__ = ()

    def _display(self) -> str:
        return mask_url(self._value)


class SecretDsn(SecretUrl):
    """A PostgreSQL URL: its password may also be a ``password=`` query parameter."""

    __slots__ = ()

    def _display(self) -> str:
        return mask_dsn(self._value)


# --------------------------------------------------------------------------- field rules


@dataclass(frozen=True)
class Rule:
    """A field's own check, as ``Annotated`` metadata: pydantic runs it while loading.

    ``check`` gets the value (after its type is validated, or before with
    ``before=True``) and returns it, possibly normalised, or raises
    ``ValueError`` with the message the operator sees beside the field's key.
    """

    check: Callable[[Any], Any]
    before: bool = False

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        from pydantic_core import core_schema

        if self.before:
            return core_schema.no_info_before_validator_function(self.check, handler(source))
        return core_schema.no_info_after_validator_function(self.check, handler(source))


def split_host_port(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too); ``ValueError`` names what is wrong."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"expected host:port, got {address!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {port_text!r}")
    return host, int(port_text)


def _check_listen(address: str) -> str:
    split_host_port(address)
    return address


def _check_url(url: str, schemes: tuple[str, ...]) -> SplitResult:
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        raise ValueError(f"scheme must be {' or '.join(schemes)}, got {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port: {exc}") from None
    return parts


def _unambiguous_userinfo(url: str) -> None:
    """Refuse an ``@`` after the host part: an unencoded ``/``, ``?`` or ``#`` in the password.

    Such a URL parses as a different host (``user``) and a path holding the
    rest of the password, so it fails far away from its cause, or worse, works
    against the wrong host.
    """
    parts = urlsplit(url)
    if "@" in url.partition("://")[2].removeprefix(parts.netloc):
        raise ValueError(
            "the user name or password contains '/', '?' or '#': "
            "percent-encode them (%2F, %3F, %23)"
        )


def _blank_to_none(value: Any) -> Any:
    """An empty secret means "not set", as in config.example.toml's ``sign_secret = ""``."""
    if value == "" or (isinstance(value, Secret) and not value.get_secret_value()):
        return None
    return value


def _server_url(schemes: tuple[str, ...]) -> Callable[[Any], Any]:
    """A check for a secret URL: one of ``schemes``, with a host and an unambiguous password."""

    def check(url: Secret | None) -> Secret | None:
        if url is None:
            return None
        try:
            _unambiguous_userinfo(url.get_secret_value())
            _check_url(url.get_secret_value(), schemes)
        except ValueError as exc:
            raise ValueError(f"{exc} (in {url})") from None
        return url

    return check


def _grpc_url(url: str | None) -> str | None:
    if url is None:
        return None
    parts = _check_url(url, ("grpc", "grpcs"))
    if parts.username or parts.password or parts.path not in ("", "/") or parts.fragment:
        raise ValueError("expected grpc[s]://host:port[?options], nothing else")
    return url


def _no_empty_keys(keys: list[Secret]) -> list[Secret]:
    if any(not key.get_secret_value() for key in keys):
        raise ValueError("an accepted key must not be empty")
    return keys


def _known_level(level: str) -> str:
    upper = level.upper()
    if upper not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return upper


def _unique_ids(ids: list[int]) -> list[int]:
    if len(set(ids)) != len(ids):
        raise ValueError("microgrid ids must not repeat")
    return ids


Listen = Annotated[str, Rule(_check_listen)]
OptionalSecret = Annotated[Secret | None, Rule(_blank_to_none, before=True)]
PositiveFloat = Annotated[float, Gt(0)]

_FORBID_EXTRA: dict[str, Any] = {"extra": "forbid"}
_LOCAL_BROKER = SecretUrl("amqp://guest:guest@localhost:5672/")


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class LocalApiConfig:
    """The local dispatch API, embedded in ``run`` or served alone by ``dispatchd api``."""

    __pydantic_config__: ClassVar[dict[str, Any]] = _FORBID_EXTRA

    listen: Listen = "127.0.0.1:50051"
    database: Path = Path("dispatches.sqlite3")
    auth_keys: Annotated[list[Secret], Rule(_no_empty_keys)] = field(default_factory=list)
    sign_secret: OptionalSecret = None


@dataclass(frozen=True)
class ApiConfig:
    """The dispatch API to sync from; ``url`` unset means the embedded local API."""

    __pydantic_config__: ClassVar[dict[str, Any]] = _FORBID_EXTRA

    url: Annotated[str | None, Rule(_grpc_url)] = None
    auth_key: OptionalSecret = None
    sign_secret: OptionalSecret = None
    call_timeout: PositiveFloat = 60.0
    stream_timeout: PositiveFloat = 300.0
    first_sync_timeout: PositiveFloat = 30.0
    max_receive_bytes: Annotated[int, Ge(4 * 1024 * 1024), Le(2**31 - 1)] = 64 * 1024 * 1024
    """Largest List page or stream event accepted from the API (gRPC's default is 4 MiB)."""
    max_streams_per_channel: Annotated[int, Ge(1)] = 64
    """Microgrids per gRPC channel (connection): below the stream limits of common
    servers and proxies, with room for listings (``apichannel.ClientPool``)."""
    local: LocalApiConfig = field(default_factory=LocalApiConfig)

    @property
    def client_url(self) -> str | None:
        """The URL in the form ``DispatchApiClient`` takes (it knows only ``grpc://``).

        ``grpcs://`` becomes ``grpc://…?ssl=true``; ``None`` when embedded.
        """
        if self.url is None:
            return None
        parts = urlsplit(self.url)
        if parts.scheme == "grpc":
            return self.url
        query = dict(parse_qsl(parts.query))
        query["ssl"] = "true"
        return urlunsplit(("grpc", parts.netloc, "", urlencode(query), ""))


@dataclass(frozen=True)
class AmqpConfig:
    """The RabbitMQ broker and the topic exchange the daemon publishes to."""

    __pydantic_config__: ClassVar[dict[str, Any]] = _FORBID_EXTRA

    url: Annotated[SecretUrl, Rule(_server_url(("amqp", "amqps")))] = _LOCAL_BROKER
    exchange: Annotated[str, Len(1, 255)] = "dispatch"


@dataclass(frozen=True)
class StateConfig:
    """Where the daemon keeps its state: SQLite in ``dir``, or PostgreSQL at ``url``.

    With ``url`` set, replicas sharing the database divide the microgrids
    among themselves (docs/replicas.md).
    """

    __pydantic_config__: ClassVar[dict[str, Any]] = _FORBID_EXTRA

    dir: Path = Path("./var")
    url: Annotated[
        SecretDsn | None,
        Rule(_blank_to_none, before=True),
        Rule(_server_url(("postgresql", "postgres"))),
    ] = None


def default_replica_id() -> str:
    """Host name, pid and a random suffix: unique even for a restart with the same pid."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class ClusterConfig:
    """How replicas on PostgreSQL share the microgrids (unused with the SQLite store)."""

    __pydantic_config__: ClassVar[dict[str, Any]] = _FORBID_EXTRA

    replica_id: Annotated[str | None, Len(1, 200)] = None
    """Unset: :func:`default_replica_id`, chosen once when the daemon starts."""
    lease_seconds: Annotated[float, Ge(1.0), Le(3600.0)] = 10.0


@dataclass(frozen=True)
class HttpConfig:
    """The /metrics, /livez and /readyz listener."""

    __pydantic_config__: ClassVar[dict[str, Any]] = _FORBID_EXTRA

    listen: Listen = "127.0.0.1:9464"


@dataclass(frozen=True)
class LogConfig:
    """Log level and renderer; ``auto`` picks console on a TTY, else JSON."""

    __pydantic_config__: ClassVar[dict[str, Any]] = _FORBID_EXTRA

    level: Annotated[str, Rule(_known_level)] = "INFO"
    format: Literal["auto", "json", "console"] = "auto"


@dataclass(frozen=True)
class Settings:
    """The whole configuration.

    ``microgrid_ids`` defaults to ``[1]`` so that a bare ``dispatchd run``
    against the embedded API (which serves any microgrid) works with no file.
    """

    microgrid_ids: Annotated[list[Annotated[int, Gt(0)]], MinLen(1), Rule(_unique_ids)] = field(
        default_factory=lambda: [1]
    )
    shutdown_timeout: PositiveFloat = 10.0
    api: ApiConfig = field(default_factory=ApiConfig)
    amqp: AmqpConfig = field(default_factory=AmqpConfig)
    state: StateConfig = field(default_factory=StateConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def embedded_api(self) -> bool:
        """Whether ``run`` starts the local API itself (``api.url`` unset)."""
        return self.api.url is None

    def secret_values(self) -> list[str]:
        """The plain text of every configured secret, so logs can mask them anywhere."""
        values = [key.get_secret_value() for key in self.api.local.auth_keys]
        for secret in (self.api.auth_key, self.api.sign_secret, self.api.local.sign_secret):
            if secret is not None:
                values.append(secret.get_secret_value())
        password = urlsplit(self.amqp.url.get_secret_value()).password
        if password:
            # aio-pika logs and reports the decoded form (``%2F`` as ``/``).
            values.extend({password, unquote(password)})
        if self.state.url is not None:
            values.extend(sorted(dsn_passwords(self.state.url.get_secret_value())))
        return values

    @property
    def log_level(self) -> int:
        """The ``logging`` level number for ``log.level``."""
        level: int = logging.getLevelNamesMapping()[self.log.level]
        return level

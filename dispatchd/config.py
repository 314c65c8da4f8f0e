"""Configuration: defaults < TOML file < ``DISPATCHD_*`` environment, validated once.

Everything that reads settings gets a frozen :class:`Settings`; nothing else in
the project looks at files or the environment for configuration. Secrets are
``SecretStr`` (or :class:`SecretUrl` for the AMQP URL) so that printing or
logging a settings object never shows them, and each secret also accepts a
``<key>_file`` variant that is read here, before validation, so a missing file
is reported with its key like any other problem.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import tomllib
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings.sources import ConfigFileSourceType

__all__ = [
    "ENV_PREFIX",
    "SECRET_KEYS",
    "AmqpConfig",
    "ApiConfig",
    "ClusterConfig",
    "ConfigError",
    "HttpConfig",
    "LocalApiConfig",
    "LogConfig",
    "SecretDsn",
    "SecretUrl",
    "Settings",
    "StateConfig",
    "default_replica_id",
    "effective_config",
    "load_config",
    "local_problems",
    "mask_dsn",
    "mask_url",
    "redact_urls",
    "split_host_port",
]

ENV_PREFIX = "DISPATCHD_"
_ENV_NESTED = "__"
_CONFIG_ENV = ENV_PREFIX + "CONFIG"
MASK = "***"

SECRET_KEYS: tuple[str, ...] = (
    "api.auth_key",
    "api.sign_secret",
    "api.local.auth_keys",
    "api.local.sign_secret",
    "amqp.url",
    "state.url",
)
"""Dotted keys that hold secrets; each also accepts ``<key>_file``."""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(Exception):
    """Every problem found while loading the configuration, as (key, message) pairs."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems: list[tuple[str, str]] = list(problems)
        super().__init__("; ".join(f"{key}: {message}" for key, message in self.problems))


_URL_WITH_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)(\S*)@")
_AMBIGUOUS_IN_USER = frozenset("/?#")


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


class SecretUrl(SecretStr):
    """A URL whose password is a secret: shown with the password as ``***``."""

    def _display(self) -> str:
        return mask_url(self.get_secret_value())


_PASSWORD_PARAMETER = re.compile(r"([?&]password=)[^&\s]*", re.IGNORECASE)


def mask_dsn(dsn: str) -> str:
    """A PostgreSQL URL with its password hidden, in the user information or the query."""
    return _PASSWORD_PARAMETER.sub(lambda match: f"{match.group(1)}{MASK}", mask_url(dsn))


class SecretDsn(SecretUrl):
    """A PostgreSQL URL: its password may also be a ``password=`` query parameter."""

    def _display(self) -> str:
        return mask_dsn(self.get_secret_value())


def dsn_passwords(dsn: str) -> set[str]:
    """Every password in a PostgreSQL URL, as written and decoded (for masking logs)."""
    parts = urlsplit(dsn)
    found = {parts.password or ""}
    found.update(value for key, value in parse_qsl(parts.query) if key.lower() == "password")
    return {form for password in found if password for form in (password, unquote(password))}


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
    if value == "" or (isinstance(value, SecretStr) and not value.get_secret_value()):
        return None
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalApiConfig(_Section):
    """The local dispatch API, embedded in ``run`` or served alone by ``dispatchd api``."""

    listen: str = "127.0.0.1:50051"
    database: Path = Path("dispatches.sqlite3")
    auth_keys: list[SecretStr] = Field(default_factory=list)
    sign_secret: SecretStr | None = None

    _listen = field_validator("listen")(_check_listen)
    _blank = field_validator("sign_secret", mode="before")(_blank_to_none)

    @field_validator("auth_keys")
    @classmethod
    def _no_empty_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        if any(not key.get_secret_value() for key in keys):
            raise ValueError("an accepted key must not be empty")
        return keys


class ApiConfig(_Section):
    """The dispatch API to sync from; ``url`` unset means the embedded local API."""

    url: str | None = None
    auth_key: SecretStr | None = None
    sign_secret: SecretStr | None = None
    call_timeout: PositiveFloat = 60.0
    stream_timeout: PositiveFloat = 300.0
    first_sync_timeout: PositiveFloat = 30.0
    max_receive_bytes: int = Field(default=64 * 1024 * 1024, ge=4 * 1024 * 1024, le=2**31 - 1)
    """Largest List page or stream event accepted from the API (gRPC's default is 4 MiB)."""
    local: LocalApiConfig = Field(default_factory=LocalApiConfig)

    _blank = field_validator("auth_key", "sign_secret", mode="before")(_blank_to_none)

    @field_validator("url")
    @classmethod
    def _grpc_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = _check_url(url, ("grpc", "grpcs"))
        if parts.username or parts.password or parts.path not in ("", "/") or parts.fragment:
            raise ValueError("expected grpc[s]://host:port[?options], nothing else")
        return url

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


class AmqpConfig(_Section):
    """The RabbitMQ broker and the topic exchange the daemon publishes to."""

    url: SecretUrl = SecretUrl("amqp://guest:guest@localhost:5672/")
    exchange: str = Field(default="dispatch", min_length=1, max_length=255)

    @field_validator("url")
    @classmethod
    def _amqp_url(cls, url: SecretUrl) -> SecretUrl:
        try:
            _unambiguous_userinfo(url.get_secret_value())
            _check_url(url.get_secret_value(), ("amqp", "amqps"))
        except ValueError as exc:
            raise ValueError(f"{exc} (in {url})") from None
        return url


class StateConfig(_Section):
    """Where the daemon keeps its state: SQLite in ``dir``, or PostgreSQL at ``url``.

    With ``url`` set, replicas sharing the database divide the microgrids
    among themselves (docs/replicas.md).
    """

    dir: Path = Path("./var")
    url: SecretDsn | None = None

    _blank = field_validator("url", mode="before")(_blank_to_none)

    @field_validator("url")
    @classmethod
    def _postgresql_url(cls, url: SecretDsn | None) -> SecretDsn | None:
        if url is None:
            return None
        try:
            _unambiguous_userinfo(url.get_secret_value())
            _check_url(url.get_secret_value(), ("postgresql", "postgres"))
        except ValueError as exc:
            raise ValueError(f"{exc} (in {url})") from None
        return url


def default_replica_id() -> str:
    """Host name, pid and a random suffix: unique even for a restart with the same pid."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class ClusterConfig(_Section):
    """How replicas on PostgreSQL share the microgrids (unused with the SQLite store)."""

    replica_id: str | None = Field(default=None, min_length=1, max_length=200)
    """Unset: :func:`default_replica_id`, chosen once when the daemon starts."""
    lease_seconds: float = Field(default=10.0, ge=1.0, le=3600.0)


class HttpConfig(_Section):
    """The /metrics, /livez and /readyz listener."""

    listen: str = "127.0.0.1:9464"

    _listen = field_validator("listen")(_check_listen)


class LogConfig(_Section):
    """Log level and renderer; ``auto`` picks console on a TTY, else JSON."""

    level: str = "INFO"
    format: Literal["auto", "json", "console"] = "auto"

    @field_validator("level")
    @classmethod
    def _known_level(cls, level: str) -> str:
        upper = level.upper()
        if upper not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
        return upper


class Settings(BaseSettings):
    """The whole configuration.

    ``microgrid_ids`` defaults to ``[1]`` so that a bare ``dispatchd run``
    against the embedded API (which serves any microgrid) works with no file.
    """

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=_ENV_NESTED,
    )

    microgrid_ids: list[PositiveInt] = Field(default_factory=lambda: [1], min_length=1)
    shutdown_timeout: PositiveFloat = 10.0
    api: ApiConfig = Field(default_factory=ApiConfig)
    amqp: AmqpConfig = Field(default_factory=AmqpConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment over TOML file over defaults, within :func:`load_config`.

        The file and the environment are what that call was given (tests pass a
        mapping), so they come from its :class:`_Loading` rather than from the
        library's defaults. Outside it, ``Settings(...)`` is exactly its arguments.
        """
        loading = _LOADING.get()
        if loading is None:
            return (init_settings,)
        toml_file = _TomlFileSource(settings_cls, loading)  # its problems are listed first
        environment = _EnvironmentSource(settings_cls, loading)
        return (init_settings, environment, toml_file, _SecretFileSource(settings_cls, loading))

    @field_validator("microgrid_ids")
    @classmethod
    def _unique_ids(cls, ids: list[int]) -> list[int]:
        if len(set(ids)) != len(ids):
            raise ValueError("microgrid ids must not repeat")
        return ids

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


# --------------------------------------------------------------------------- loading


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> Settings:
    """Load defaults < TOML file < environment and validate, or raise one ``ConfigError``.

    ``path`` None falls back to ``DISPATCHD_CONFIG`` and then to no file.
    ``env`` None means ``os.environ``; tests pass their own mapping.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    if path is None and environ.get(_CONFIG_ENV):
        path = Path(environ[_CONFIG_ENV])
    loading = _Loading(path, environ)
    token = _LOADING.set(loading)
    try:
        settings = _resolved(Settings())
    except ValidationError as exc:
        raise ConfigError([*loading.problems, *map(_problem, exc.errors())]) from None
    except ConfigError as exc:
        raise ConfigError([*loading.problems, *exc.problems]) from None
    finally:
        _LOADING.reset(token)
    if loading.problems:
        raise ConfigError(loading.problems)
    return settings


def _resolved(settings: Settings) -> Settings:
    """Make state.dir absolute, put a relative database under it, lend the local API's auth.

    Absolute paths make the printed configuration load back to the same
    values and keep the daemon independent of later working-directory changes.
    With ``api.url`` unset the daemon talks to its own local API, so its
    client credentials default to the local API's accepted key and secret,
    and contradicting them is an error rather than a silent auth failure.
    """
    state = settings.state.model_copy(update={"dir": settings.state.dir.absolute()})
    local = settings.api.local.model_copy(
        update={"database": state.dir / settings.api.local.database}
    )
    api = settings.api
    if api.url is None:
        api = _lend_local_credentials(api, local)
    api = api.model_copy(update={"local": local})
    return settings.model_copy(update={"api": api, "state": state})


_UNACCEPTED_AUTH_KEY = (
    "api.auth_key",
    "must be one of api.local.auth_keys when the embedded local API is used (api.url unset)",
)
_OTHER_SIGN_SECRET = (
    "api.sign_secret",
    "must equal api.local.sign_secret when the embedded local API is used (api.url unset)",
)


def _lend_local_credentials(api: ApiConfig, local: LocalApiConfig) -> ApiConfig:
    accepted = [key.get_secret_value() for key in local.auth_keys]
    if api.auth_key is None and accepted:
        api = api.model_copy(update={"auth_key": local.auth_keys[0]})
    elif api.auth_key is not None and accepted and api.auth_key.get_secret_value() not in accepted:
        raise ConfigError([_UNACCEPTED_AUTH_KEY])
    if api.sign_secret is None and local.sign_secret is not None:
        api = api.model_copy(update={"sign_secret": local.sign_secret})
    elif (
        api.sign_secret is not None
        and local.sign_secret is not None
        and api.sign_secret.get_secret_value() != local.sign_secret.get_secret_value()
    ):
        raise ConfigError([_OTHER_SIGN_SECRET])
    return api


def local_problems(settings: Settings) -> list[tuple[str, str]]:
    """What would make ``run`` fail and can be known without a network, as (key, message).

    ``check-config`` and ``run`` both refuse these. They are kept out of
    :func:`load_config` because some look at the file system, and because
    settings for other uses (tests, ``tail``, ``schedule``) need not pass them.
    """
    problems: list[tuple[str, str]] = []
    if settings.amqp.exchange.startswith("amq."):
        problems.append(
            (
                "amqp.exchange",
                "names starting with 'amq.' are reserved by the broker, which refuses "
                "to let dispatchd declare them; choose another name, e.g. 'dispatch'",
            )
        )
    if settings.api.url is not None and settings.api.auth_key is None:
        problems.append(
            (
                "api.auth_key",
                "required when api.url is set: the dispatch API refuses calls without "
                "a key (set api.auth_key or api.auth_key_file)",
            )
        )
    if settings.embedded_api and _same_listen_address(
        settings.http.listen, settings.api.local.listen
    ):
        problems.append(
            (
                "http.listen",
                f"{settings.http.listen} is also where the embedded local API listens "
                f"(api.local.listen = {settings.api.local.listen}); choose another port",
            )
        )
    state_problem = _unusable_directory(settings.state.dir)
    if state_problem is not None:
        problems.append(("state.dir", state_problem))
    return problems


_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
_LOOPBACK_NAMES = {"localhost": frozenset({"127.0.0.1", "::1"})}


def _same_listen_address(first: str, second: str) -> bool:
    """Whether two listeners would fight over one port (a wildcard takes every address)."""
    host_a, port_a = split_host_port(first)
    host_b, port_b = split_host_port(second)
    if port_a != port_b or port_a == 0:
        return False
    host_a, host_b = host_a.lower(), host_b.lower()
    if host_a == host_b or host_a in _WILDCARD_HOSTS or host_b in _WILDCARD_HOSTS:
        return True
    return host_b in _LOOPBACK_NAMES.get(host_a, ()) or host_a in _LOOPBACK_NAMES.get(host_b, ())


def _unusable_directory(directory: Path) -> str | None:
    """Why the daemon could not keep its files in ``directory`` (made on start), or None."""
    try:
        return _directory_problem(directory)
    except OSError as exc:
        return f"cannot inspect {directory}: {exc.strerror or exc}"


def _directory_problem(directory: Path) -> str | None:
    if directory.exists():
        if not directory.is_dir():
            return f"{directory} exists and is not a directory"
        if not os.access(directory, os.W_OK | os.X_OK):
            return f"{directory} is not writable by this user"
        return None
    parent = directory.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create {directory}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {directory}: {parent} is not writable by this user"
    return None


@dataclass
class _Loading:
    """One :func:`load_config` call: what its sources read, and what they find wrong.

    The sources add problems here instead of raising, so that every problem,
    theirs and validation's, is reported at once.
    """

    path: Path | None
    environ: Mapping[str, str]
    problems: list[tuple[str, str]] = field(default_factory=list)
    secret_files: dict[str, Any] = field(default_factory=dict)
    """``<secret>_file`` values by secret key, from the highest source that set one."""


_LOADING: ContextVar[_Loading | None] = ContextVar("dispatchd_config_loading", default=None)


class _TomlFileSource(TomlConfigSettingsSource):
    """The ``--config`` file; missing, unreadable or broken is a problem, not "no file"."""

    def __init__(self, settings_cls: type[BaseSettings], loading: _Loading) -> None:
        self._loading = loading
        super().__init__(settings_cls, toml_file=loading.path)

    def _read_files(
        self, files: ConfigFileSourceType | None, deep_merge: bool = False
    ) -> dict[str, Any]:
        path = self._loading.path
        return {} if path is None else _read_toml(path, self._loading.problems)

    def __call__(self) -> dict[str, Any]:
        return _take_secret_files(super().__call__(), self._loading)


class _EnvironmentSource(EnvSettingsSource):
    """``DISPATCHD_A__B=v`` from the given mapping; unknown names are problems, not ignored.

    A misspelt variable (one ``_`` instead of ``__``) would otherwise be
    dropped silently, which is exactly the mistake ``extra="forbid"`` is for.
    List and table values are JSON (``DISPATCHD_MICROGRID_IDS='[7, 8]'``).
    """

    def __init__(self, settings_cls: type[BaseSettings], loading: _Loading) -> None:
        self._loading = loading
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        known: dict[str, str | None] = {}
        for name in sorted(self._loading.environ):
            value = self._loading.environ[name]
            if _known_variable(name, value, self._loading.problems):
                known[name if self.case_sensitive else name.lower()] = value
        return known

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        """JSON ``null`` stays text for validation to refuse, rather than meaning "not set"."""
        decoded = super().decode_complex_value(field_name, field, value)
        return value if decoded is None else decoded

    def __call__(self) -> dict[str, Any]:
        return _take_secret_files(super().__call__(), self._loading)


def _known_variable(name: str, value: str, problems: list[tuple[str, str]]) -> bool:
    """Whether ``name`` sets a setting with a value of the right shape; else why not."""
    if not name.upper().startswith(ENV_PREFIX) or name.upper() == _CONFIG_ENV:
        return False
    path = name[len(ENV_PREFIX) :].lower().split(_ENV_NESTED)
    annotation = _env_target(path)
    if annotation is None:
        hint = f" (nested keys are separated by '{_ENV_NESTED}')" if len(path) == 1 else ""
        problems.append((name, f"unknown setting{hint}"))
        return False
    if _is_model(annotation) or _is_list(annotation):
        try:
            json.loads(value)
        except json.JSONDecodeError as exc:
            problems.append((name, f"expected JSON, e.g. '[7, 8]': {exc.msg}"))
            return False
    return True


class _SecretFileSource(PydanticBaseSettingsSource):
    """Each ``<secret>_file`` as the file's content, trailing newline stripped.

    It comes last, so the sources above have set aside their ``_file`` keys
    and :attr:`current_state` holds every value they set: a secret given both
    ways, in any sources, is a problem.
    """

    def __init__(self, settings_cls: type[BaseSettings], loading: _Loading) -> None:
        super().__init__(settings_cls)
        self._loading = loading

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # secrets are read whole in __call__

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for key in SECRET_KEYS:
            if key not in self._loading.secret_files:
                continue
            *parents, leaf = key.split(".")
            if leaf in _section(self.current_state, parents):
                self._loading.problems.append((key, f"set either {leaf} or {leaf}_file, not both"))
                continue
            content = _read_secret_file(
                f"{key}_file", self._loading.secret_files[key], self._loading.problems
            )
            if content is None:
                continue
            section = values
            for part in parents:
                section = section.setdefault(part, {})
            if leaf == "auth_keys":
                section[leaf] = [line.strip() for line in content.splitlines() if line.strip()]
            else:
                section[leaf] = content
        return values


def _take_secret_files(data: dict[str, Any], loading: _Loading) -> dict[str, Any]:
    """``data`` without its ``<secret>_file`` keys, which go to :class:`_SecretFileSource`."""
    for key in SECRET_KEYS:
        *parents, leaf = key.split(".")
        section = _section(data, parents)
        if f"{leaf}_file" in section:
            loading.secret_files.setdefault(key, section.pop(f"{leaf}_file"))
    return data


def _section(data: Mapping[str, Any], parents: Sequence[str]) -> dict[str, Any]:
    """The table at ``parents`` in source data, or an empty one."""
    section: Any = data
    for part in parents:
        section = section.get(part) if isinstance(section, Mapping) else None
    return section if isinstance(section, dict) else {}


def _read_secret_file(file_key: str, file_name: Any, problems: list[tuple[str, str]]) -> str | None:
    if not isinstance(file_name, str) or not file_name:
        problems.append((file_key, "must be a file path"))
        return None
    try:
        return Path(file_name).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        problems.append((file_key, f"cannot read {file_name}: {reason}"))
        return None


def _read_toml(path: Path, problems: list[tuple[str, str]]) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        problems.append(("config", f"cannot read {path}: {exc.strerror or exc}"))
        return {}
    except UnicodeDecodeError as exc:
        problems.append(("config", f"{path} is not UTF-8 text: {exc.reason}"))
        return {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problems.append(("config", f"{path}: invalid TOML: {exc}"))
        return {}


def _problem(error: Mapping[str, Any]) -> tuple[str, str]:
    """A pydantic error as (dotted key, message); model-level errors have no loc."""
    key = ".".join(str(part) for part in error["loc"]) or "config"
    message = str(error["msg"])
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    return key, message


def _section_fields(model: type[BaseModel]) -> dict[str, Any]:
    return {name: info.annotation for name, info in model.model_fields.items()}


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_list(annotation: Any) -> bool:
    return get_origin(annotation) is list or any(
        get_origin(arg) is list for arg in get_args(annotation)
    )


def _env_target(path: Sequence[str]) -> Any:
    """The annotation of the setting at ``path``, or None if there is no such setting."""
    annotation: Any = Settings
    for depth, part in enumerate(path):
        if not _is_model(annotation):
            return None
        fields = _section_fields(annotation)
        is_last = depth == len(path) - 1
        secret = ".".join([*path[:depth], part.removesuffix("_file")])
        if is_last and part.endswith("_file") and secret in SECRET_KEYS:
            return str
        if part not in fields:
            return None
        annotation = fields[part]
    return annotation


# --------------------------------------------------------------------------- printing


def effective_config(settings: Settings) -> dict[str, Any]:
    """The settings as plain data with every secret masked, for ``check-config``.

    Unset optional values are left out (TOML has no null).
    """
    return _plain(settings)


def _plain(model: BaseModel) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if value is None:
            continue
        result[name] = _plain_value(value)
    return result


def _plain_value(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return _plain(value)
    if isinstance(value, SecretUrl):  # SecretDsn too: its own mask
        return str(value)
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, list):
        return [_plain_value(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value

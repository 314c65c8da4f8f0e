"""Loading the configuration: defaults < TOML file < ``DISPATCHD_*`` environment, validated once.

Everything that reads settings gets a frozen :class:`~dispatchd.settings.Settings`;
nothing else in the project looks at files or the environment for
configuration. pydantic-settings reads the sources and pydantic validates them
into those plain dataclasses, so pydantic is loaded only here: ``run`` hands
the result to a daemon process that never imports it (:mod:`dispatchd.handoff`).
Each secret also accepts a ``<key>_file`` variant that is read here, before
validation, so a missing file is reported with its key like any other problem.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin, get_type_hints

from pydantic import Field, ValidationError, create_model
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings.sources import ConfigFileSourceType

from dispatchd.settings import (
    MASK,
    ApiConfig,
    ConfigError,
    LocalApiConfig,
    Secret,
    SecretUrl,
    Settings,
    split_host_port,
)

__all__ = [
    "ENV_PREFIX",
    "SECRET_KEYS",
    "effective_config",
    "load_config",
    "local_problems",
]

ENV_PREFIX = "DISPATCHD_"
_ENV_NESTED = "__"
_CONFIG_ENV = ENV_PREFIX + "CONFIG"

SECRET_KEYS: tuple[str, ...] = (
    "api.auth_key",
    "api.sign_secret",
    "api.local.auth_keys",
    "api.local.sign_secret",
    "amqp.url",
    "state.url",
)
"""Dotted keys that hold secrets; each also accepts ``<key>_file``."""


def _field_types(cls: type[Any]) -> dict[str, Any]:
    """A settings dataclass's fields and their annotations, ``Annotated`` rules included."""
    hints = get_type_hints(cls, include_extras=True)
    return {item.name: hints[item.name] for item in dataclasses.fields(cls)}


def _bare(annotation: Any) -> Any:
    """The type inside ``Annotated[...]`` metadata."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


class _Sources(BaseSettings):
    """What pydantic-settings needs around :class:`Settings`'s fields: sources and their order."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=_ENV_NESTED,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment over TOML file over defaults, as given to one :func:`load_config` call.

        The file and the environment are what that call was given (tests pass a
        mapping), so they come from its :class:`_Loading` rather than from the
        library's defaults.
        """
        loading = _LOADING.get()
        if loading is None:
            raise RuntimeError("settings are loaded only by load_config")
        toml_file = _TomlFileSource(settings_cls, loading)  # its problems are listed first
        environment = _EnvironmentSource(settings_cls, loading)
        return (init_settings, environment, toml_file, _SecretFileSource(settings_cls, loading))


def _sources_model() -> type[BaseSettings]:
    """:class:`Settings` as a pydantic-settings model: the same fields, defaults and rules."""
    annotations = _field_types(Settings)
    fields: dict[str, Any] = {}
    for item in dataclasses.fields(Settings):
        default = (
            item.default
            if item.default_factory is dataclasses.MISSING
            else Field(default_factory=item.default_factory)
        )
        fields[item.name] = (annotations[item.name], default)
    return create_model("Settings", __base__=_Sources, **fields)


_SettingsModel = _sources_model()


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
        model = _SettingsModel()
        settings = _resolved(
            Settings(**{name: getattr(model, name) for name in _field_types(Settings)})
        )
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
    replace = dataclasses.replace
    state = replace(settings.state, dir=settings.state.dir.absolute())
    local = replace(settings.api.local, database=state.dir / settings.api.local.database)
    api = settings.api
    if api.url is None:
        api = _lend_local_credentials(api, local)
    return replace(settings, api=replace(api, local=local), state=state)


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
        api = dataclasses.replace(api, auth_key=local.auth_keys[0])
    elif api.auth_key is not None and accepted and api.auth_key.get_secret_value() not in accepted:
        raise ConfigError([_UNACCEPTED_AUTH_KEY])
    if api.sign_secret is None and local.sign_secret is not None:
        api = dataclasses.replace(api, sign_secret=local.sign_secret)
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

    def next_field(
        self, field: FieldInfo | Any | None, key: str, case_sensitive: bool | None = None
    ) -> FieldInfo | None:
        """The field ``key`` of a section; the library walks only pydantic models."""
        annotation = _bare(field.annotation if isinstance(field, FieldInfo) else field)
        if not (isinstance(annotation, type) and is_dataclass(annotation)):
            return super().next_field(field, key, case_sensitive)
        fields = _field_types(annotation)
        name = key if key in fields else key.lower()
        return FieldInfo.from_annotation(fields[name]) if name in fields else None

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
    if _is_section(annotation) or _is_list(annotation):
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
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        message = "unknown key"
    elif message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    return key, message


def _is_section(annotation: Any) -> bool:
    """Whether a setting is a section (a table) rather than a value."""
    bare = _bare(annotation)
    return isinstance(bare, type) and is_dataclass(bare)


def _is_list(annotation: Any) -> bool:
    annotation = _bare(annotation)
    return get_origin(annotation) is list or any(
        get_origin(arg) is list for arg in get_args(annotation)
    )


def _env_target(path: Sequence[str]) -> Any:
    """The annotation of the setting at ``path``, or None if there is no such setting."""
    annotation: Any = Settings
    for depth, part in enumerate(path):
        if not _is_section(annotation):
            return None
        fields = _field_types(_bare(annotation))
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


def _plain(section: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name in _field_types(type(section)):
        value = getattr(section, name)
        if value is None:
            continue
        result[name] = _plain_value(value)
    return result


def _plain_value(value: Any) -> Any:
    if is_dataclass(value):
        return _plain(value)
    if isinstance(value, SecretUrl):  # SecretDsn too: its own mask
        return str(value)
    if isinstance(value, Secret):
        return MASK
    if isinstance(value, list):
        return [_plain_value(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value

"""What the wire modules share: ``WireError``, the schema name, the time format,
JSON dumping and loading, and the typed readers that name the offending key.

Times are written in UTC with a ``Z`` and the shortest exact fraction: none
for whole seconds, milliseconds when the microseconds are a multiple of 1000,
microseconds otherwise. That reproduces the examples in docs/messages.md
(``10:00:00Z``, ``10:00:00.004Z``) and still round-trips every ``datetime``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from enum import Enum
from functools import lru_cache
from typing import Any, TypeVar

from dispatchd.core.times import utc

SCHEMA = "dispatchd/v1"

JSON_BOOL = {False: "false", True: "true"}
"""A bool as JSON text, for the bodies written by hand."""


class WireError(ValueError):
    """A body or request that does not follow docs/messages.md (or cannot be encoded).

    ``code`` is the snapshot RPC error code (``malformed``, ``unknown_method``);
    ``key`` is the dotted path of the offending key when there is one.
    """

    def __init__(self, message: str, *, code: str = "malformed", key: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.key = key


@lru_cache(maxsize=4096)
def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with ``Z`` and the shortest exact fraction (0, 3 or 6 digits).

    A naive datetime is taken to be UTC, as the model does. Cached: a burst of
    messages repeats the same few instants (equal instants in other zones
    share an entry, rightly: they have the same UTC text).
    """
    return _format_time(moment)


def _format_time(moment: datetime) -> str:
    if moment.tzinfo is not UTC:
        moment = utc(moment)
    # isoformat (C code) writes a four-digit year, 0 or 6 fraction digits and
    # "+00:00"; only that suffix and the millisecond case need cutting.
    text = moment.isoformat()[:-6]
    micros = moment.microsecond
    if micros and micros % 1000 == 0:
        return text[:-3] + "Z"
    return text + "Z"


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)


def parse_time(text: str) -> datetime:
    """Any RFC 3339 time (``Z`` or an offset) as an aware UTC datetime.

    Fractions finer than a microsecond are truncated: ``datetime`` cannot hold them.
    """
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    year, month, day, hour, minute, second = (int(group) for group in match.groups()[:6])
    fraction, zulu, sign, offset_hours, offset_minutes = match.groups()[6:]
    micros = int((fraction or "")[:6].ljust(6, "0"))
    moment = datetime(year, month, day, hour, minute, second, micros, tzinfo=UTC)
    if zulu is None:
        if int(offset_hours) > 23 or int(offset_minutes) > 59:
            raise ValueError(f"offset out of range: {text!r}")
        offset = timedelta(hours=int(offset_hours), minutes=int(offset_minutes))
        try:
            moment -= offset if sign == "+" else -offset
        except OverflowError as error:
            raise ValueError(f"out of range in UTC: {text!r}") from error
    return moment


def _format_optional_time(moment: datetime | None) -> str | None:
    return None if moment is None else format_time(moment)


def _time_or_null(moment: datetime | None) -> str:
    """A time as a JSON string, or ``null``."""
    return "null" if moment is None else f'"{format_time(moment)}"'


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise WireError(f"{what}: not encodable as UTF-8: {text!r}", key=what) from error


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _dump_text(obj: Any) -> str:
    try:
        return _ENCODER.encode(obj)
    except (TypeError, ValueError) as error:
        raise WireError(f"cannot encode as JSON: {error}") from error


def _dump(obj: dict[str, Any]) -> bytes:
    return _utf8(_dump_text(obj), "body")


def _reject_constant(name: str) -> Any:
    raise WireError(f"body: {name} is not JSON")


def _load(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as error:
        raise WireError(f"body: not UTF-8: {error}") from error
    except json.JSONDecodeError as error:
        raise WireError(f"body: not JSON: {error}") from error
    except WireError:
        raise
    except ValueError as error:  # an integer beyond Python's digit limit for conversions
        raise WireError("body: a number has too many digits") from error
    except RecursionError as error:
        raise WireError("body: nested too deeply") from error
    return _object(obj, "body")


def _check_schema(obj: dict[str, Any]) -> None:
    schema = _str(_get(obj, "schema"), "schema")
    if schema != SCHEMA:
        raise WireError(f"schema: expected {SCHEMA!r}, got {schema!r}", key="schema")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _get(obj: dict[str, Any], key: str, path: str = "") -> Any:
    if key not in obj:
        full = _join(path, key)
        raise WireError(f"{full}: missing", key=full)
    return obj[key]


def _describe(value: Any) -> str:
    text = json.dumps(value) if _is_json_scalar(value) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _is_json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WireError(f"{path}: expected an object, got {_describe(value)}", key=path)
    return value


def _list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise WireError(f"{path}: expected a list, got {_describe(value)}", key=path)
    return value


def _int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError(f"{path}: expected an integer, got {_describe(value)}", key=path)
    return value


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise WireError(f"{path}: expected true or false, got {_describe(value)}", key=path)
    return value


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise WireError(f"{path}: expected a string, got {_describe(value)}", key=path)
    return value


def _time(value: Any, path: str) -> datetime:
    try:
        return parse_time(_str(value, path))
    except WireError:
        raise
    except ValueError as error:
        raise WireError(f"{path}: {error}", key=path) from error


_EnumT = TypeVar("_EnumT", bound=Enum)


def _enum(enum: type[_EnumT], value: Any, path: str, *, by_value: bool = False) -> _EnumT:
    """A member by name (or, for our own string enums, by value)."""
    text = _str(value, path)
    try:
        return enum(text) if by_value else enum[text]
    except (KeyError, ValueError) as error:
        raise WireError(f"{path}: unknown value {text!r}", key=path) from error


_ValueT = TypeVar("_ValueT")


def _optional(parse: Callable[[Any, str], _ValueT], value: Any, path: str) -> _ValueT | None:
    return None if value is None else parse(value, path)

"""Routing keys, binding keys and message ids: where a message goes and what names it.

Both are pure functions of the message, so a retry or a recomputation of the
same transition gets the same key and the same id (docs/messages.md).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

from dispatchd.core.messages import Event, Kind, Message, RunningMessage
from dispatchd.core.times import epoch_micros
from dispatchd.core.wire._reader import WireError, _utf8

MAX_ROUTING_KEY_BYTES = 255

_LIFECYCLE_EVENTS = (Event.CREATED, Event.UPDATED, Event.DELETED)
_RUNNING_EVENTS = (Event.RUNNING, Event.STOPPED)
_EVENTS_OF_KIND = {Kind.LIFECYCLE: _LIFECYCLE_EVENTS, Kind.RUNNING: _RUNNING_EVENTS}
_TYPE_DIGEST_HEX = 16
_CUT_MARK = "~"
# Largest decimal microgrid id a binding with a wildcard id has to cover (uint64).
_MAX_MICROGRID_DIGITS = len(str(2**64 - 1))


_UNESCAPED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def escape_type(dispatch_type: str) -> str:
    """Make any string one routing word: bytes outside ``[A-Za-z0-9_-]`` become ``%XX``."""
    return "".join(
        chr(byte) if byte in _UNESCAPED else f"%{byte:02X}" for byte in _utf8(dispatch_type, "type")
    )


_TYPE_CACHE_SIZE = 4096
"""Distinct types remembered by the routing-word caches; types repeat a lot."""


@lru_cache(maxsize=_TYPE_CACHE_SIZE)
def _type_digest(dispatch_type: str) -> str:
    return hashlib.sha256(_utf8(dispatch_type, "type")).hexdigest()[:_TYPE_DIGEST_HEX]


@lru_cache(maxsize=_TYPE_CACHE_SIZE)
def _type_word(dispatch_type: str, budget: int) -> str:
    """The escaped type, cut to ``budget`` bytes with ``~`` + digest when it is longer.

    ``~`` never occurs in an escaped type, so a cut word cannot equal an uncut one.
    """
    escaped = escape_type(dispatch_type)
    if len(escaped) <= budget:
        return escaped
    keep = budget - len(_CUT_MARK) - _TYPE_DIGEST_HEX
    if keep < 0:
        raise WireError(f"no room for the type in a {MAX_ROUTING_KEY_BYTES}-byte routing key")
    head = escaped[:keep]
    # A '%' in the last two kept bytes would split its escape: drop it and its digits.
    split_escape = head.rfind("%", max(0, keep - 2))
    if split_escape != -1:
        head = head[:split_escape]
    return head + _CUT_MARK + _type_digest(dispatch_type)


def _key_prefix(microgrid_word: str, kind: Kind, event_word: str) -> str:
    return f"microgrid.{microgrid_word}.{kind.value}.{event_word}."


@lru_cache(maxsize=_TYPE_CACHE_SIZE)
def _routing_key(microgrid_id: int, kind: Kind, event: Event, dispatch_type: str) -> str:
    prefix = _key_prefix(str(microgrid_id), kind, event.value)
    return prefix + _type_word(dispatch_type, MAX_ROUTING_KEY_BYTES - len(prefix))


def routing_key(message: Message) -> str:
    """``microgrid.<id>.<kind>.<event>.<escaped type>``, at most 255 bytes."""
    return _routing_key(
        message.dispatch.microgrid_id, message.kind, message.event, message.routing_type
    )


def binding_key(
    microgrid_id: int | None,
    kind: Kind | str,
    event: Event | str | None,
    dispatch_type: str | None,
) -> str:
    """A binding key matching the routing keys of these values; ``None`` is ``*``.

    A type long enough to be cut is cut where the routing key cuts it, which
    depends on the length of the microgrid id; with a wildcard id such a type
    cannot be matched by one binding, and that is a ``ValueError``.
    """
    kind = Kind(kind)
    events = _EVENTS_OF_KIND[kind]
    if event is not None:
        event = Event(event)
        if event not in events:
            raise ValueError(f"{event.value!r} is not a {kind.value} event")
    microgrid_word = "*" if microgrid_id is None else str(microgrid_id)
    event_word = "*" if event is None else event.value
    if dispatch_type is None:
        return _key_prefix(microgrid_word, kind, event_word) + "*"
    microgrid_words = (
        [str(microgrid_id)]
        if microgrid_id is not None
        else ["9" * digits for digits in range(1, _MAX_MICROGRID_DIGITS + 1)]
    )
    event_words = [event.value] if event is not None else [e.value for e in events]
    type_words = {
        _type_word(dispatch_type, MAX_ROUTING_KEY_BYTES - len(_key_prefix(mg, kind, ev)))
        for mg in microgrid_words
        for ev in event_words
    }
    if len(type_words) != 1:
        raise ValueError(
            "this type is cut in routing keys at a place that depends on the microgrid id; "
            "bind it with a concrete microgrid id"
        )
    return _key_prefix(microgrid_word, kind, event_word) + type_words.pop()


def message_id(message: Message) -> str:
    """A deterministic id: the same transition always gets the same one.

    Running: ``<microgrid>.<dispatch>.r<sequence>``; the engine's per-dispatch
    sequence is strictly increasing and persisted, so it names the transition.
    Lifecycle: ``<microgrid>.<dispatch>.<event>.<update_time µs>.<type digest>``;
    ``created``/``deleted`` happen once per dispatch and ``updated`` once per
    strictly newer ``update_time``, except on a type change, where the two copies
    differ by routing type. The digest (64 bits of SHA-256) stands for the type
    only to bound the id's length; two types of one update colliding is
    practically impossible. ``emitted_at`` is left out on purpose: a retry or a
    recomputation emits later but is the same transition.
    """
    dispatch = message.dispatch
    if isinstance(message, RunningMessage):
        return f"{dispatch.microgrid_id}.{dispatch.id}.r{message.sequence}"
    return (
        f"{dispatch.microgrid_id}.{dispatch.id}.{message.event.value}."
        f"{epoch_micros(dispatch.update_time)}.{_type_digest(message.routing_type)}"
    )

"""Routing keys, binding keys and message ids (docs/messages.md §§ 2 and 3)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from dispatchd.core import wire
from dispatchd.core.messages import Event, Kind, LifecycleMessage, Message, RunningMessage
from tests.core.wire_helpers import (
    FEW,
    lifecycle_messages,
    messages,
    running_messages,
    spec_dispatch,
    spec_message,
)

ESCAPED_WORD = re.compile(r"(?:[A-Za-z0-9_-]|%[0-9A-F]{2})*")
CUT_WORD = re.compile(r"((?:[A-Za-z0-9_-]|%[0-9A-F]{2})*)~([0-9a-f]{16})")
PREFIX = "microgrid.7.lifecycle.created."


def topic_matches(binding: str, key: str) -> bool:
    """RabbitMQ topic matching: ``*`` is one word, ``#`` zero or more."""

    def match(pattern: list[str], words: list[str]) -> bool:
        if not pattern:
            return not words
        head, rest = pattern[0], pattern[1:]
        if head == "#":
            return any(match(rest, words[skip:]) for skip in range(len(words) + 1))
        if not words:
            return False
        return (head == "*" or head == words[0]) and match(rest, words[1:])

    return match(binding.split("."), key.split("."))


def lifecycle(dispatch_type: str, microgrid_id: int = 7) -> LifecycleMessage:
    dispatch = replace(spec_dispatch(), type=dispatch_type, microgrid_id=microgrid_id)
    return LifecycleMessage(
        event=Event.CREATED,
        dispatch=dispatch,
        routing_type=dispatch_type,
        emitted_at=dispatch.create_time,
    )


def type_word(key: str) -> str:
    return key.split(".", 4)[4]


def sha16(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -------------------------------------------------------------------- escaping


@pytest.mark.parametrize(
    ("dispatch_type", "word"),
    [
        ("PEAK_SHAVING", "PEAK_SHAVING"),
        ("a-b_c9", "a-b_c9"),
        ("a.b", "a%2Eb"),
        ("*", "%2A"),
        ("#", "%23"),
        ("%", "%25"),
        ("%2E", "%252E"),
        (" ", "%20"),
        ("~", "%7E"),
        ("é", "%C3%A9"),
        ("日", "%E6%97%A5"),
        ("\x00", "%00"),
        ("", ""),
    ],
)
def test_type_escaping(dispatch_type: str, word: str) -> None:
    assert wire.escape_type(dispatch_type) == word
    assert wire.routing_key(lifecycle(dispatch_type)) == PREFIX + word


def test_running_key_uses_the_dispatch_type() -> None:
    message = replace(spec_message(), dispatch=replace(spec_dispatch(), type="peak shaving"))
    assert wire.routing_key(message) == "microgrid.7.running.running.peak%20shaving"


# ----------------------------------------------------------------- cut at 255


def test_type_that_just_fits_is_not_cut() -> None:
    room = 255 - len(PREFIX)
    fits = "x" * room
    assert wire.routing_key(lifecycle(fits)) == PREFIX + fits

    over = "x" * (room + 1)
    key = wire.routing_key(lifecycle(over))
    assert len(key) == 255
    assert key == PREFIX + "x" * (room - 17) + "~" + sha16(over)


@pytest.mark.parametrize("split_at", [1, 2])
def test_cut_never_splits_an_escape(split_at: int) -> None:
    room = 255 - len(PREFIX)
    # Plain letters, then escapes positioned so the naive cut lands inside one.
    keep = room - 17
    dispatch_type = "x" * (keep - split_at) + "." * 100
    word = type_word(wire.routing_key(lifecycle(dispatch_type)))
    assert word == "x" * (keep - split_at) + "~" + sha16(dispatch_type)


def test_cut_ends_exactly_after_a_whole_escape() -> None:
    room = 255 - len(PREFIX)
    keep = room - 17
    dispatch_type = "x" * (keep - 3) + "." * 100
    word = type_word(wire.routing_key(lifecycle(dispatch_type)))
    assert word == "x" * (keep - 3) + "%2E~" + sha16(dispatch_type)


def test_cut_depends_on_the_microgrid_id_length() -> None:
    dispatch_type = "y" * 300
    short = type_word(wire.routing_key(lifecycle(dispatch_type, microgrid_id=7)))
    long = type_word(wire.routing_key(lifecycle(dispatch_type, microgrid_id=123456789)))
    assert len(short) == len(long) + 8
    assert short.endswith("~" + sha16(dispatch_type))
    assert long.endswith("~" + sha16(dispatch_type))


long_types = st.one_of(
    st.text(min_size=60, max_size=400),
    st.text(alphabet="a.%é日", min_size=60, max_size=400),
)
microgrid_ids = st.integers(min_value=0, max_value=2**64 - 1)


@FEW
@given(messages, st.one_of(st.text(), long_types), microgrid_ids)
def test_any_type_gives_a_valid_routing_key(
    message: Message, dispatch_type: str, microgrid_id: int
) -> None:
    message = replace(message, dispatch=replace(message.dispatch, microgrid_id=microgrid_id))
    if isinstance(message, LifecycleMessage):
        message = replace(message, routing_type=dispatch_type)
    else:
        message = replace(message, dispatch=replace(message.dispatch, type=dispatch_type))
    key = wire.routing_key(message)

    assert len(key.encode()) <= 255
    words = key.split(".")
    assert len(words) == 5
    assert words[:4] == ["microgrid", str(microgrid_id), message.kind.value, message.event.value]
    assert not any("*" in word or "#" in word for word in words)
    word = words[4]
    escaped = wire.escape_type(dispatch_type)
    prefix = f"microgrid.{microgrid_id}.{message.kind.value}.{message.event.value}."
    if len(prefix) + len(escaped) <= 255:
        # Not cut: the word decodes back to the type, so the escaping is injective.
        assert ESCAPED_WORD.fullmatch(word)
        assert word == escaped
        assert unquote_to_bytes(word).decode() == dispatch_type
    else:
        cut = CUT_WORD.fullmatch(word)
        assert cut is not None
        head, digest = cut.groups()
        assert escaped.startswith(head)
        assert digest == sha16(dispatch_type)
        # Cut as late as allowed: at most a two-byte tail of a split escape is lost.
        assert len(key) >= 253


@FEW
@given(st.text(max_size=60), st.text(max_size=60))
def test_distinct_short_types_give_distinct_keys(first: str, second: str) -> None:
    assume(first != second)
    assert wire.routing_key(lifecycle(first)) != wire.routing_key(lifecycle(second))


# --------------------------------------------------------------------- binding


def test_binding_key_examples() -> None:
    assert (
        wire.binding_key(7, Kind.RUNNING, None, "PEAK_SHAVING")
        == "microgrid.7.running.*.PEAK_SHAVING"
    )
    assert wire.binding_key(None, "lifecycle", None, None) == "microgrid.*.lifecycle.*.*"
    assert wire.binding_key(3, Kind.LIFECYCLE, "updated", "a.b") == (
        "microgrid.3.lifecycle.updated.a%2Eb"
    )
    assert wire.binding_key(None, Kind.RUNNING, Event.STOPPED, "") == "microgrid.*.running.stopped."


def test_binding_key_rejects_an_event_of_the_other_kind() -> None:
    with pytest.raises(ValueError, match="not a running event"):
        wire.binding_key(7, Kind.RUNNING, Event.CREATED, None)


def test_long_type_needs_a_concrete_microgrid_to_bind() -> None:
    with pytest.raises(ValueError, match="concrete microgrid id"):
        wire.binding_key(None, Kind.RUNNING, None, "z" * 300)


@FEW
@given(messages, st.one_of(st.text(), long_types))
def test_binding_key_matches_its_routing_keys(message: Message, other_type: str) -> None:
    key = wire.routing_key(message)
    dispatch = message.dispatch
    kind, event, routing_type = message.kind, message.event, message.routing_type
    microgrid_id = dispatch.microgrid_id

    assert wire.binding_key(microgrid_id, kind, event, routing_type) == key
    assert topic_matches(wire.binding_key(microgrid_id, kind, None, routing_type), key)
    assert topic_matches(wire.binding_key(microgrid_id, kind, None, None), key)
    assert topic_matches(wire.binding_key(None, kind, None, None), key)
    try:
        any_microgrid = wire.binding_key(None, kind, event, routing_type)
    except ValueError:
        assert len(key) > 200  # only types that are cut somewhere refuse a wildcard id
    else:
        assert topic_matches(any_microgrid, key)
    if other_type != routing_type:
        assert not topic_matches(wire.binding_key(microgrid_id, kind, None, other_type), key)
    assert not topic_matches(wire.binding_key(microgrid_id + 1, kind, None, None), key)


def test_spec_binding_examples_match() -> None:
    key = wire.routing_key(spec_message())
    for binding in ["microgrid.7.running.*.PEAK_SHAVING", "microgrid.7.#"]:
        assert topic_matches(binding, key)
    assert topic_matches("microgrid.*.lifecycle.#", wire.routing_key(lifecycle("x")))
    assert not topic_matches("microgrid.*.lifecycle.#", key)


# ----------------------------------------------------------------- message ids


def transition(message: Message) -> tuple[object, ...]:
    """What identifies a transition; emitted_at and the other fields do not."""
    dispatch = message.dispatch
    if isinstance(message, RunningMessage):
        return ("running", dispatch.microgrid_id, dispatch.id, message.sequence)
    return (
        "lifecycle",
        dispatch.microgrid_id,
        dispatch.id,
        message.event,
        dispatch.update_time,
        message.routing_type,
    )


small = st.integers(min_value=0, max_value=2)


@st.composite
def colliding_messages(draw: st.DrawFn) -> Message:
    """Messages drawn from a tiny space so that equal transitions really occur."""
    message: Message = draw(st.one_of(lifecycle_messages(), running_messages()))
    base = datetime(2026, 1, 1, tzinfo=UTC)
    dispatch = replace(
        message.dispatch,
        microgrid_id=draw(small),
        id=draw(small),
        update_time=base + draw(small) * timedelta(microseconds=1),
    )
    if isinstance(message, RunningMessage):
        return replace(message, dispatch=dispatch, sequence=draw(small))
    return replace(
        message,
        dispatch=dispatch,
        event=draw(st.sampled_from([Event.CREATED, Event.UPDATED, Event.DELETED])),
        routing_type=draw(st.sampled_from(["A", "B", "a.b", "a%2Eb"])),
    )


@FEW
@given(colliding_messages(), colliding_messages())
def test_message_ids_identify_transitions(first: Message, second: Message) -> None:
    same_transition = transition(first) == transition(second)
    assert (wire.message_id(first) == wire.message_id(second)) == same_transition


@FEW
@given(messages, st.datetimes(timezones=st.just(UTC)))
def test_retry_or_recomputation_keeps_the_id(message: Message, later: datetime) -> None:
    again = replace(message, emitted_at=later)
    if isinstance(again, RunningMessage):
        again = replace(again, scheduled_for=later, missed_runs=(later,))
    assert wire.encode(again).message_id == wire.encode(message).message_id
    assert len(wire.encode(message).message_id.encode()) <= 255  # AMQP shortstr


def test_type_change_gives_two_lifecycle_ids() -> None:
    dispatch = replace(spec_dispatch(), type="NEW")
    new = LifecycleMessage(
        event=Event.UPDATED, dispatch=dispatch, routing_type="NEW", emitted_at=dispatch.update_time
    )
    old = replace(new, routing_type="OLD")
    assert wire.message_id(new) != wire.message_id(old)
    assert wire.encode(new).routing_key.endswith(".NEW")
    assert wire.encode(old).routing_key.endswith(".OLD")


def test_update_time_counts_to_the_microsecond() -> None:
    message = lifecycle("T")
    later = replace(
        message,
        dispatch=replace(
            message.dispatch, update_time=message.dispatch.update_time + timedelta(microseconds=1)
        ),
    )
    assert wire.message_id(message) != wire.message_id(later)


def test_running_id_format() -> None:
    assert wire.message_id(spec_message()) == "7.42.r3"


@pytest.mark.parametrize("length", [150, 206, 207, 226, 227, 400])
def test_binding_with_event_wildcard_matches_every_event_of_a_long_type(length: int) -> None:
    dispatch_type = "q" * length
    binding = wire.binding_key(7, Kind.LIFECYCLE, None, dispatch_type)
    for event in (Event.CREATED, Event.UPDATED, Event.DELETED):
        message = replace(lifecycle(dispatch_type), event=event)
        assert topic_matches(binding, wire.routing_key(message))
    # Up to 206 bytes the word is the same for every uint64 microgrid id.
    if length <= 206:
        any_microgrid = wire.binding_key(None, Kind.LIFECYCLE, None, dispatch_type)
        big = lifecycle(dispatch_type, microgrid_id=2**64 - 1)
        assert topic_matches(any_microgrid, wire.routing_key(big))
        assert topic_matches(any_microgrid, wire.routing_key(lifecycle(dispatch_type)))
    else:
        with pytest.raises(ValueError, match="concrete microgrid id"):
            wire.binding_key(None, Kind.LIFECYCLE, None, dispatch_type)

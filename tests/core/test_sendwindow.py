"""The send window without a broker: which outbox messages may go, in what order."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatchd.core.sendwindow import SendWindow


@dataclass(frozen=True)
class Item:
    seq: int
    dispatch: str


def dispatch_of(item: Item) -> str:
    return item.dispatch


def window(
    *,
    max_in_flight: int = 1000,
    max_per_dispatch: int = 1,
    retry_interval: float = 1.0,
    max_retry_interval: float = 30.0,
) -> SendWindow[Item, str]:
    return SendWindow(
        dispatch_of=dispatch_of,
        max_in_flight=max_in_flight,
        max_per_dispatch=max_per_dispatch,
        retry_interval=retry_interval,
        max_retry_interval=max_retry_interval,
    )


def items(dispatches: str, start: int = 1) -> list[Item]:
    """``"ABA"`` -> A1, B2, A3: one item per letter, seq in order."""
    return [Item(seq, d) for seq, d in enumerate(dispatches, start)]


def take_all(win: SendWindow[Item, str], now: float = 0.0) -> list[int]:
    taken = []
    while (item := win.take(now)) is not None:
        taken.append(item.seq)
    return taken


def test_one_message_per_dispatch_in_flight_and_the_next_after_its_confirm() -> None:
    win = window()
    a1, b2, a3, a4, b5 = items("ABAAB")
    for item in (a1, b2, a3, a4, b5):
        assert win.add(item)
    assert take_all(win) == [1, 2]
    assert win.confirm(a1)
    assert take_all(win) == [3]
    assert win.confirm(b2)
    assert take_all(win) == [5]
    assert win.confirm(a3)
    assert take_all(win) == [4]
    assert (len(win), win.in_flight) == (2, 2)


def test_an_item_already_in_the_window_is_not_added_twice() -> None:
    win = window()
    (a1,) = items("A")
    assert win.add(a1)
    assert not win.add(a1)
    assert 1 in win
    assert take_all(win) == [1]


def test_the_global_limit_bounds_what_is_in_flight() -> None:
    win = window(max_in_flight=2)
    first, second, third = items("ABC")
    for item in (first, second, third):
        win.add(item)
    assert take_all(win) == [1, 2]
    win.confirm(second)
    assert take_all(win) == [3]
    assert win.peak_in_flight == 2


def test_a_wider_window_per_dispatch_sends_that_many_at_once() -> None:
    win = window(max_per_dispatch=3)
    batch = items("AAAAA")
    for item in batch:
        win.add(item)
    assert take_all(win) == [1, 2, 3]
    win.confirm(batch[0])
    assert take_all(win) == [4]


def test_a_nacked_message_goes_first_for_its_dispatch_after_its_wait_only() -> None:
    win = window(retry_interval=1.0, max_retry_interval=30.0)
    a1, b2, a3, b4 = items("ABAB")
    for item in (a1, b2, a3, b4):
        win.add(item)
    assert take_all(win, now=10.0) == [1, 2]
    assert win.nack(a1, now=10.0) == 1.0
    assert (win.waiting_dispatches, win.next_retry_at, win.nacked) == (1, 11.0, 1)
    win.confirm(b2)
    assert take_all(win, now=10.5) == [4]  # the other dispatch goes on
    assert take_all(win, now=11.0) == [1]  # the refused one again, before A's next
    win.confirm(a1)
    assert take_all(win, now=11.0) == [3]
    assert (win.waiting_dispatches, win.next_retry_at) == (0, None)


def test_the_wait_doubles_per_consecutive_nack_up_to_the_limit_and_a_confirm_resets_it() -> None:
    win = window(retry_interval=1.0, max_retry_interval=5.0)
    (a1,) = items("A")
    win.add(a1)
    waits = []
    now = 0.0
    for _ in range(5):
        assert take_all(win, now) == [1]
        waits.append(win.nack(a1, now))
        now += waits[-1]
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert take_all(win, now) == [1]
    win.confirm(a1)
    (a2,) = items("A", start=2)
    win.add(a2)
    assert take_all(win, now) == [2]
    assert win.nack(a2, now) == 1.0


def test_a_new_round_sends_everything_unconfirmed_again_in_seq_order() -> None:
    win = window(retry_interval=100.0)
    a1, b2, a3, c4 = items("ABAC")
    for item in (a1, b2, a3, c4):
        win.add(item)
    win.start_round()
    assert take_all(win) == [1, 2, 4]
    win.nack(b2, now=0.0)
    win.confirm(c4)
    win.abandon(a1)  # the round failed: no answer for it
    assert win.in_flight == 0
    win.start_round()  # ends B's wait too: the round republishes in seq order
    assert take_all(win) == [1, 2]
    assert win.rounds == 2
    assert win.next_retry_at is None


def test_limits_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        window(max_per_dispatch=0)
    with pytest.raises(ValueError, match="at least 1"):
        window(max_in_flight=0)


# --- random confirm / nack / failure sequences ------------------------------

DISPATCHES = "ABCD"

operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.text(DISPATCHES, min_size=1, max_size=6)),
        st.tuples(st.just("take"), st.none()),
        st.tuples(st.just("confirm"), st.integers(0, 10)),
        st.tuples(st.just("nack"), st.integers(0, 10)),
        st.tuples(st.just("fail"), st.none()),
        st.tuples(st.just("time"), st.sampled_from([0.0, 0.5, 1.0, 3.0])),
    ),
    max_size=80,
)


@dataclass
class Model:
    """What the window was told and what it answered, checked against the rules."""

    win: SendWindow[Item, str]
    per_dispatch: int
    now: float = 0.0
    next_seq: int = 1
    added: dict[int, Item] = field(default_factory=dict)
    in_flight: list[Item] = field(default_factory=list)
    confirmed: list[Item] = field(default_factory=list)
    sends: dict[int, int] = field(default_factory=dict)
    resends_due: dict[int, int] = field(default_factory=dict)
    waiting_until: dict[str, float] = field(default_factory=dict)

    def unconfirmed(self, dispatch: str) -> list[int]:
        done = {item.seq for item in self.confirmed}
        return sorted(s for s, i in self.added.items() if i.dispatch == dispatch and s not in done)

    def take_all(self) -> None:
        # A dispatch's wait after a nack ends at the first take at or after its retry time.
        for dispatch, until in list(self.waiting_until.items()):
            if self.now >= until:
                del self.waiting_until[dispatch]
        while (item := self.win.take(self.now)) is not None:
            assert item.seq not in {i.seq for i in self.in_flight}
            if self.per_dispatch == 1:
                # A refused dispatch waits; nothing of a dispatch goes before every
                # earlier message of it is confirmed. (A wider window gives up that order:
                # what was let go before the nack still goes.)
                assert item.dispatch not in self.waiting_until
                assert item.seq == self.unconfirmed(item.dispatch)[0]
            self.in_flight.append(item)
            self.sends[item.seq] = self.sends.get(item.seq, 0) + 1
            self.check_bounds()
        if self.win.in_flight < 4:
            # Held back only behind its own unconfirmed message or its own wait.
            busy = {i.dispatch for i in self.in_flight}
            for dispatch in DISPATCHES:
                waiting = dispatch in self.waiting_until
                assert dispatch in busy or waiting or not self.unconfirmed(dispatch)

    def check_bounds(self) -> None:
        assert self.win.in_flight == len(self.in_flight) <= 4
        for dispatch in DISPATCHES:
            assert sum(i.dispatch == dispatch for i in self.in_flight) <= self.per_dispatch

    def settle(self, index: int, how: str) -> None:
        item = self.in_flight.pop(index % len(self.in_flight))
        if how == "confirm":
            assert self.win.confirm(item)
            self.confirmed.append(item)
        else:
            self.resends_due[item.seq] = self.resends_due.get(item.seq, 0) + 1
            if how == "nack":
                wait = self.win.nack(item, self.now)
                self.waiting_until.setdefault(item.dispatch, self.now + wait)
            else:
                self.win.abandon(item)

    def apply(self, operation: str, argument: object) -> None:
        if operation == "add":
            assert isinstance(argument, str)
            for dispatch in argument:
                item = Item(self.next_seq, dispatch)
                self.next_seq += 1
                assert self.win.add(item)
                self.added[item.seq] = item
        elif operation == "take":
            self.take_all()
        elif operation in ("confirm", "nack") and self.in_flight:
            assert isinstance(argument, int)
            self.settle(argument, operation)
        elif operation == "fail":
            # The channel went: every publish in flight ends unanswered, then a new round.
            while self.in_flight:
                self.settle(0, "abandon")
            self.win.start_round()
            self.waiting_until.clear()
        elif operation == "time":
            assert isinstance(argument, float)
            self.now += argument
        self.check_bounds()

    def drain(self) -> None:
        """Every publish from now on is confirmed: everything must get out."""
        for _ in range(10_000):
            while self.in_flight:
                self.settle(0, "confirm")
            self.take_all()
            if not self.in_flight:
                if not len(self.win):
                    return
                retry_at = self.win.next_retry_at
                assert retry_at is not None  # held for nothing but a wait
                self.now = max(self.now, retry_at)
        raise AssertionError("the window did not drain")


@settings(max_examples=300, deadline=None)
@given(ops=operations, per_dispatch=st.integers(1, 3))
def test_random_confirms_nacks_and_failures_keep_order_and_lose_nothing(
    ops: list[tuple[str, object]], per_dispatch: int
) -> None:
    win = window(
        max_in_flight=4, max_per_dispatch=per_dispatch, retry_interval=1.0, max_retry_interval=4.0
    )
    model = Model(win, per_dispatch)
    for operation, argument in ops:
        model.apply(operation, argument)
    model.drain()

    # Each message confirmed exactly once; sent once more per nack or failure only.
    assert sorted(item.seq for item in model.confirmed) == sorted(model.added)
    for seq in model.added:
        assert model.sends[seq] == 1 + model.resends_due.get(seq, 0)
    if per_dispatch == 1:
        for dispatch in DISPATCHES:
            confirmed = [i.seq for i in model.confirmed if i.dispatch == dispatch]
            assert confirmed == sorted(confirmed)
    assert (len(win), win.in_flight, win.waiting_dispatches) == (0, 0, 0)


@settings(max_examples=200, deadline=None)
@given(
    letters=st.text(alphabet="ABCD", min_size=1, max_size=30),
    dropped=st.sets(st.sampled_from("ABCD")),
    taken_first=st.integers(0, 10),
)
def test_dropped_dispatches_never_go_and_the_others_keep_their_order(
    letters: str, dropped: set[str], taken_first: int
) -> None:
    """What another process publishes now leaves the window, even while in flight."""
    win = window(max_per_dispatch=1)
    queued = items(letters)
    for item in queued:
        win.add(item)
    in_flight = []
    while len(in_flight) < taken_first and (item := win.take(0.0)) is not None:
        in_flight.append(item)
    gone = win.drop(lambda item: item.dispatch in dropped)
    assert sorted(item.seq for item in gone) == [i.seq for i in queued if i.dispatch in dropped]
    assert len(win) == sum(1 for i in queued if i.dispatch not in dropped)
    sent = [item.seq for item in in_flight]
    for item in in_flight:  # confirmed after the drop: only the kept ones count
        assert win.confirm(item) is (item.dispatch not in dropped)
    sent.extend(take_all_confirming(win))
    for letter in set(letters) - dropped:  # each kept dispatch complete and in order
        own = [i.seq for i in queued if i.dispatch == letter]
        assert [seq for seq in sent if seq in own] == own
    assert not {i.seq for i in queued if i.dispatch in dropped} & set(sent[len(in_flight) :])
    assert len(win) == 0 and win.in_flight == 0


def take_all_confirming(win: SendWindow[Item, str]) -> list[int]:
    """Take and confirm one at a time until nothing may go."""
    taken = []
    while (item := win.take(0.0)) is not None:
        taken.append(item.seq)
        win.confirm(item)
    return taken

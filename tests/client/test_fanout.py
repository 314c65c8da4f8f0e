"""Fan-out: every receiver gets every message; a slow one loses messages alone.

Lifecycle receivers drop their oldest; running-state receivers coalesce per
dispatch and never lose the newest message of a dispatch.
"""

from __future__ import annotations

import asyncio
import gc

import pytest
from frequenz.channels import ReceiverStoppedError
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatchd.client._fanout import DeliveryCounts, FanOut, ReceiverFetcher


async def drain(receiver: object, count: int) -> list[int]:
    return [await asyncio.wait_for(receiver.receive(), 1) for _ in range(count)]  # type: ignore[attr-defined]


async def test_every_receiver_gets_every_message_after_its_priming() -> None:
    state = [1, 2]
    fan_out: FanOut[int] = FanOut("numbers", prime=lambda: list(state))
    fetcher = ReceiverFetcher(fan_out)
    first = fetcher.new_receiver()
    await fan_out.send(3)
    state.append(3)
    second = fetcher.new_receiver(name="second")
    await fan_out.send(4)
    assert await drain(first, 4) == [1, 2, 3, 4]
    assert await drain(second, 4) == [1, 2, 3, 4]


async def test_a_slow_receiver_drops_its_oldest_and_does_not_block_others() -> None:
    fan_out: FanOut[int] = FanOut("numbers")
    slow = fan_out.new_receiver(limit=3)
    fast = fan_out.new_receiver(limit=100)
    for number in range(10):
        await fan_out.send(number)
    assert await drain(fast, 10) == list(range(10))
    assert await drain(slow, 3) == [7, 8, 9]


async def test_transform_per_receiver() -> None:
    fan_out: FanOut[int] = FanOut("numbers")
    plain = fan_out.new_receiver()
    doubled = fan_out.new_receiver(transform=lambda n: [n, n] if n % 2 else [])
    for number in range(4):
        await fan_out.send(number)
    assert await drain(plain, 4) == [0, 1, 2, 3]
    assert await drain(doubled, 4) == [1, 1, 3, 3]


async def test_close_ends_receivers_and_refuses_new_ones() -> None:
    fan_out: FanOut[int] = FanOut("numbers")
    receiver = fan_out.new_receiver()
    await fan_out.send(1)
    await fan_out.close()
    assert [n async for n in receiver] == [1]
    with pytest.raises(ReceiverStoppedError):
        await receiver.receive()
    with pytest.raises(RuntimeError, match="stopped"):
        fan_out.new_receiver()


async def test_dropped_receivers_are_forgotten() -> None:
    fan_out: FanOut[int] = FanOut("numbers")
    kept = fan_out.new_receiver()
    fan_out.new_receiver()
    gc.collect()
    await fan_out.send(1)
    assert len(fan_out._outlets) == 1
    assert await drain(kept, 1) == [1]


async def test_held_messages_go_to_the_next_receiver_only() -> None:
    fan_out: FanOut[int] = FanOut("numbers", hold=3)
    for number in range(5):
        await fan_out.send(number)
    first = fan_out.new_receiver()
    second = fan_out.new_receiver()
    await fan_out.send(5)
    assert await drain(first, 4) == [2, 3, 4, 5]
    assert await drain(second, 1) == [5]
    unheld: FanOut[int] = FanOut("numbers")
    await unheld.send(1)
    late = unheld.new_receiver()
    await unheld.send(2)
    assert await drain(late, 1) == [2]


def by_dispatch(message: tuple[str, int]) -> str:
    return message[0]


async def drain_all(receiver: object) -> list[tuple[str, int]]:
    got = []
    while receiver._pending:  # type: ignore[attr-defined]
        got.append(await drain(receiver, 1))
    return [item for batch in got for item in batch]  # type: ignore[misc]


async def test_a_full_running_receiver_coalesces_per_dispatch_instead_of_dropping() -> None:
    counts = DeliveryCounts()
    fan_out: FanOut[tuple[str, int]] = FanOut("running", key=by_dispatch, counts=counts)
    slow = fan_out.new_receiver(limit=2)
    for message in [("a", 1), ("b", 1), ("a", 2), ("b", 2)]:
        await fan_out.send(message)
    # Dropping the oldest would have lost a's stop (a, 2).
    assert await drain_all(slow) == [("a", 2), ("b", 2)]
    assert counts.coalesced == 2 and counts.dropped == 0


async def test_the_newest_of_every_dispatch_is_kept_even_past_the_limit() -> None:
    fan_out: FanOut[tuple[str, int]] = FanOut("running", key=by_dispatch)
    slow = fan_out.new_receiver(limit=2)
    for message in [("a", 1), ("b", 1), ("c", 1)]:
        await fan_out.send(message)
    assert await drain_all(slow) == [("a", 1), ("b", 1), ("c", 1)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from("abcd"), max_size=60), st.integers(1, 6))
async def test_coalescing_keeps_each_newest_in_order_of_arrival(
    keys: list[str], limit: int
) -> None:
    counts = DeliveryCounts()
    fan_out: FanOut[tuple[str, int]] = FanOut("running", key=by_dispatch, counts=counts)
    slow = fan_out.new_receiver(limit=limit)
    sent = [(key, index) for index, key in enumerate(keys)]
    for message in sent:
        await fan_out.send(message)
    kept = await drain_all(slow)
    newest = {key: message for message in sent for key in [message[0]]}
    assert set(newest.values()) <= set(kept)
    assert kept == [message for message in sent if message in kept]  # a subsequence, in order
    assert len(kept) <= max(limit, len(newest))
    assert counts.coalesced == len(sent) - len(kept)


async def test_a_lifecycle_receiver_still_drops_its_oldest_and_counts_it() -> None:
    counts = DeliveryCounts()
    fan_out: FanOut[int] = FanOut("lifecycle", counts=counts)
    slow = fan_out.new_receiver(limit=2)
    for number in range(5):
        await fan_out.send(number)
    assert await drain(slow, 2) == [3, 4]
    assert counts.dropped == 3


async def test_held_running_messages_replace_what_the_prime_says_about_their_dispatch() -> None:
    state = [("a", 0), ("b", 0)]
    fan_out: FanOut[tuple[str, int]] = FanOut(
        "running", prime=lambda: list(state), hold=10, key=by_dispatch
    )
    await fan_out.send(("b", 1))
    await fan_out.send(("c", 1))
    first = fan_out.new_receiver()
    assert await drain_all(first) == [("a", 0), ("b", 1), ("c", 1)]
    second = fan_out.new_receiver()  # nothing held any more: the prime alone
    assert await drain_all(second) == [("a", 0), ("b", 0)]

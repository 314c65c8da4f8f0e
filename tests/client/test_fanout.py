"""Fan-out: every receiver gets every message; a slow one drops its oldest, alone."""

from __future__ import annotations

import asyncio
import gc

import pytest
from frequenz.channels import ReceiverStoppedError

from dispatchd.client._fanout import FanOut, ReceiverFetcher


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

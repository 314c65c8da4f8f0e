"""SoloOwnership: the SQLite mode owns every configured microgrid at term 0 until closed."""

from __future__ import annotations

import asyncio

from dispatchd.ownership import Acquired, OwnershipEvent, SoloOwnership


async def test_solo_ownership_acquires_every_microgrid_once_and_ends_when_closed() -> None:
    ownership = SoloOwnership([3, 1, 2])
    assert ownership.terms() == {3: 0, 1: 0, 2: 0}
    events = ownership.events()
    async with asyncio.timeout(5):
        seen: list[OwnershipEvent] = [await anext(events) for _ in range(3)]
    standing_by = asyncio.create_task(anext(events, None))
    await asyncio.sleep(0.05)
    assert not standing_by.done()  # it stands by: nothing is ever lost in this mode
    await ownership.close()
    async with asyncio.timeout(5):
        assert await standing_by is None
    assert seen == [Acquired(3, 0, None), Acquired(1, 0, None), Acquired(2, 0, None)]


async def test_a_released_microgrid_has_no_term_any_more() -> None:
    ownership = SoloOwnership([1, 2])
    await ownership.release(1, 0)
    assert ownership.terms() == {2: 0}

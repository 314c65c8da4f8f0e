"""Unit tests of ``managed_actor.PeakShavingActor`` with the SDK's fake dispatcher.

No broker, no daemon: ``FakeDispatcher`` runs dispatchd's own scheduling on a
clock the test moves, so a day of dispatches takes milliseconds. Run them
with::

    pytest examples/test_managed_actor.py
"""

from __future__ import annotations

from datetime import timedelta

from frequenz.channels import Receiver
from frequenz.client.dispatch.recurrence import Frequency, RecurrenceRule
from frequenz.client.dispatch.types import TargetIds
from managed_actor import PeakShavingActor

from dispatchd.client import DispatchInfo, MergeByTypeTarget
from dispatchd.client.testing import FakeDispatcher

HOUR = timedelta(hours=1)


class Factory:
    """Builds the actors like ``PeakShavingActor.new`` and keeps them for the test."""

    def __init__(self) -> None:
        self.actors: list[PeakShavingActor] = []
        self.lines: list[str] = []

    async def __call__(
        self, info: DispatchInfo, updates: Receiver[DispatchInfo]
    ) -> PeakShavingActor:
        actor = await PeakShavingActor.new(info, updates, report=self.lines.append)
        self.actors.append(actor)
        return actor


async def test_the_actor_starts_is_reconfigured_and_stops_with_its_dispatch() -> None:
    factory = Factory()
    async with FakeDispatcher(microgrid_id=1) as dispatcher:
        await dispatcher.start_managing("PEAK_SHAVING", actor_factory=factory)
        dispatch = await dispatcher.create(
            "PEAK_SHAVING",
            start_in=HOUR,
            duration=2 * HOUR,
            target=TargetIds(4, 5),
            payload={"limit_w": 5000},
        )
        assert factory.actors == []
        await dispatcher.advance(HOUR)
        [actor] = factory.actors
        assert actor.running and actor.settings.options == {"limit_w": 5000}
        assert actor.settings.target == TargetIds(4, 5)
        assert actor.settings.until == dispatch.start_time + 2 * HOUR
        await dispatcher.update(dispatch.id, payload={"limit_w": 4000})
        assert actor.settings.options == {"limit_w": 4000}
        await dispatcher.advance(2 * HOUR)
        assert not actor.running
        assert [line.split()[0] for line in factory.lines] == [
            "started",
            "reconfigured",
            "stopped",
        ]


async def test_a_daily_dispatch_starts_a_fresh_actor_every_day() -> None:
    factory = Factory()
    async with FakeDispatcher() as dispatcher:
        await dispatcher.start_managing("PEAK_SHAVING", actor_factory=factory)
        daily = RecurrenceRule(frequency=Frequency.DAILY, interval=1)
        await dispatcher.create(
            "PEAK_SHAVING", start_in=HOUR, duration=HOUR, recurrence=daily, dry_run=True
        )
        await dispatcher.advance(timedelta(days=3))
        assert len(factory.actors) == 3
        assert all(not actor.running and actor.settings.dry_run for actor in factory.actors)


async def test_one_actor_per_target_with_merge_by_type_target() -> None:
    factory = Factory()
    async with FakeDispatcher() as dispatcher:
        await dispatcher.start_managing(
            "PEAK_SHAVING", actor_factory=factory, merge_strategy=MergeByTypeTarget()
        )
        for target, start in ((TargetIds(1), 0), (TargetIds(2), 0), (TargetIds(1), 1)):
            await dispatcher.create(
                "PEAK_SHAVING", start_in=start * HOUR, duration=2 * HOUR, target=target
            )
        await dispatcher.advance(HOUR)
        assert [a.settings.target for a in factory.actors] == [TargetIds(1), TargetIds(2)]
        # The first target's actor ran on through its second dispatch.
        await dispatcher.advance(HOUR)
        assert [a.running for a in factory.actors] == [True, False]
        await dispatcher.advance(HOUR)
        assert [a.running for a in factory.actors] == [False, False]
        assert len(factory.actors) == 2

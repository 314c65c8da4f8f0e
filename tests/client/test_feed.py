"""``Feed``: a durable backlog first, in order, then the snapshot fills in (pure, no broker)."""

from __future__ import annotations

from dispatchd.client._fanout import DeliveryCounts
from dispatchd.client._feed import Feed
from dispatchd.core.messages import Event, Reason
from tests.client.helpers import core, running_message, snapshot


def feed() -> Feed:
    return Feed("running:T", lifecycle=None, hold_running=True, counts=DeliveryCounts())


def states(received: object) -> list[tuple[int, str, bool]]:
    got = []
    while received._pending:  # type: ignore[attr-defined]
        dispatch = received._pending.pop()  # type: ignore[attr-defined]
        got.append((dispatch.id, dispatch.running("T").name, dispatch.announced.from_snapshot))
    return got


async def test_the_backlog_comes_first_and_the_snapshot_fills_in_only_the_rest() -> None:
    subscription = feed()
    # Kept while the actor was down: 1 ran for 0 s, 2 started. The snapshot
    # (taken at start-up, after all of it) also knows 3, running for long.
    await subscription.expect_backlog(3, snapshot((1, False, 2), (2, True, 1), (3, True, 4)))
    one_shot = core(1, duration=0)
    await subscription.deliver(running_message(one_shot, 1))
    await subscription.deliver(
        running_message(one_shot, 2, event=Event.STOPPED, reason=Reason.ENDED)
    )
    assert subscription.backlog_left == 1
    await subscription.deliver(running_message(core(2), 1))
    assert subscription.backlog_left == 0
    await subscription.deliver(running_message(core(2), 1))  # a live duplicate
    receiver = subscription.running.new_receiver()  # created late: gets the held messages
    assert states(receiver) == [
        (1, "RUNNING", False),
        (1, "STOPPED", False),
        (2, "RUNNING", False),
        (3, "RUNNING", True),
    ]


async def test_a_backlog_that_never_fully_comes_can_be_ended() -> None:
    subscription = feed()
    receiver = subscription.running.new_receiver()
    await subscription.expect_backlog(5, snapshot((3, True, 4)))
    await subscription.skipped()  # a rejected (malformed) backlog message counts too
    assert subscription.backlog_left == 4 and states(receiver) == []
    await subscription.end_backlog()
    assert subscription.backlog_left == 0
    assert states(receiver) == [(3, "RUNNING", True)]


async def test_without_a_backlog_the_snapshot_is_delivered_at_once() -> None:
    subscription = feed()
    await subscription.expect_backlog(0, snapshot((3, True, 4)))
    assert states(subscription.running.new_receiver()) == [(3, "RUNNING", True)]

"""Merge strategies, pure: synthetic running-state streams through ``RunningMerger``."""

from __future__ import annotations

from frequenz.client.dispatch.types import TargetIds
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatchd.client import Dispatch, MergeByType, MergeByTypeTarget, RunningState
from dispatchd.client._fanout import DeliveryCounts, FanOut
from dispatchd.client._interface import DispatcherInterface
from dispatchd.client._merge import MergeStrategy, RunningMerger
from tests.client.helpers import announced, core


def boundary_stream(
    intervals: dict[int, tuple[int, int]], **fields: object
) -> list[tuple[int, Dispatch]]:
    """Running/stopped dispatches at each boundary, as the daemon orders them:
    by time, starts before stops, by dispatch id."""
    events: list[tuple[int, int, int, Dispatch]] = []
    for dispatch_id, (start, end) in intervals.items():
        value = core(dispatch_id, start=start, duration=end - start, **fields)  # type: ignore[arg-type]
        events.append((start, 0, dispatch_id, announced(value, running=True, sequence=1)))
        events.append((end, 1, dispatch_id, announced(value, running=False, sequence=2)))
    events.sort(key=lambda event: event[:3])
    return [(time, dispatch) for time, _, _, dispatch in events]


def run(merger: RunningMerger, stream: list[tuple[int, Dispatch]]) -> list[tuple[int, int, str]]:
    """(time, dispatch id, RUNNING/STOPPED) of what the merger forwards."""
    return [
        (time, out.id, out.running("T").name)
        for time, dispatch in stream
        for out in merger.apply(dispatch)
    ]


def test_overlap_gives_one_start_an_update_and_one_stop_at_the_end() -> None:
    # A [10, 40) with B [20, 30): A starts the interval at 10, B's start is
    # forwarded as a running update at 20, B's stop at 30 is held back, A's
    # stop at 40 ends the merged interval.
    stream = boundary_stream({1: (10, 40), 2: (20, 30)})
    forwarded = run(RunningMerger(MergeByType(), "T"), stream)
    assert forwarded == [(10, 1, "RUNNING"), (20, 2, "RUNNING"), (40, 1, "STOPPED")]
    assert [f for f in forwarded if f[2] == "STOPPED"] == [(40, 1, "STOPPED")]


def test_without_merging_every_transition_passes() -> None:
    stream = boundary_stream({1: (10, 40), 2: (20, 30)})
    assert [(t, d.id, d.running("T").name) for t, d in stream] == [
        (10, 1, "RUNNING"),
        (20, 2, "RUNNING"),
        (30, 2, "STOPPED"),
        (40, 1, "STOPPED"),
    ]


def test_back_to_back_dispatches_form_one_interval() -> None:
    stream = boundary_stream({1: (10, 20), 2: (20, 30)})
    forwarded = run(RunningMerger(MergeByType(), "T"), stream)
    assert forwarded == [(10, 1, "RUNNING"), (20, 2, "RUNNING"), (30, 2, "STOPPED")]


def test_different_dry_run_is_not_merged() -> None:
    merger = RunningMerger(MergeByType(), "T")
    real = boundary_stream({1: (10, 40)}, dry_run=False)
    dry = boundary_stream({2: (20, 30)}, dry_run=True)
    stream = sorted(real + dry, key=lambda item: (item[0], item[1].id))
    assert run(merger, stream) == [
        (10, 1, "RUNNING"),
        (20, 2, "RUNNING"),
        (30, 2, "STOPPED"),
        (40, 1, "STOPPED"),
    ]


def test_by_type_target_merges_only_equal_targets() -> None:
    same = boundary_stream({1: (10, 40), 2: (20, 30)}, target=TargetIds(1))
    other = boundary_stream({3: (15, 25)}, target=TargetIds(2))
    stream = sorted(same + other, key=lambda item: (item[0], item[1].id))
    by_target = run(RunningMerger(MergeByTypeTarget(), "T"), stream)
    assert by_target == [
        (10, 1, "RUNNING"),
        (15, 3, "RUNNING"),
        (20, 2, "RUNNING"),
        (25, 3, "STOPPED"),
        (40, 1, "STOPPED"),
    ]
    by_type = run(RunningMerger(MergeByType(), "T"), stream)
    assert [f for f in by_type if f[2] == "STOPPED"] == [(40, 1, "STOPPED")]


def test_identity_change_while_running_stops_the_old_identity() -> None:
    merger = RunningMerger(MergeByTypeTarget(), "T")
    before = announced(core(1, target=TargetIds(1)), running=True, sequence=1)
    after = announced(core(1, target=TargetIds(2)), running=True, sequence=2)
    assert merger.apply(before) == [before]
    out = merger.apply(after)
    assert [(d.target, d.running("T")) for d in out] == [
        (TargetIds(1), RunningState.STOPPED),
        (TargetIds(2), RunningState.RUNNING),
    ]


def test_custom_identity_strategy() -> None:
    class Everything(MergeStrategy):
        def identity(self, dispatch: Dispatch) -> object:
            return "all"

    stream = boundary_stream({1: (10, 40)}, dry_run=False) + boundary_stream(
        {2: (20, 50)}, dry_run=True
    )
    stream.sort(key=lambda item: (item[0], item[1].id))
    forwarded = run(RunningMerger(Everything(), "T"), stream)
    assert [f for f in forwarded if f[2] == "STOPPED"] == [(50, 2, "STOPPED")]


def union(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Maximal running intervals; touching ones join (a start precedes a stop)."""
    merged: list[list[int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


interval = st.tuples(st.integers(0, 60), st.integers(1, 30)).map(lambda p: (p[0], p[0] + p[1]))


@settings(max_examples=200, deadline=None)
@given(st.lists(interval, min_size=1, max_size=6))
def test_merged_stream_is_the_union_of_the_intervals(intervals: list[tuple[int, int]]) -> None:
    stream = boundary_stream(dict(enumerate(intervals, start=1)))
    forwarded = run(RunningMerger(MergeByType(), "T"), stream)
    expected = union(intervals)
    stops = [time for time, _, state in forwarded if state == "STOPPED"]
    assert stops == [end for _, end in expected]
    starts = [(time, dispatch_id) for time, dispatch_id, state in forwarded if state == "RUNNING"]
    assert sorted(starts) == sorted((start, i) for i, (start, _) in enumerate(intervals, start=1))
    # After every boundary the merged state (last forwarded) is running iff
    # some interval covers that instant.
    state = "STOPPED"
    merger = RunningMerger(MergeByType(), "T")
    for index, (time, dispatch) in enumerate(stream):
        for out in merger.apply(dispatch):
            state = out.running("T").name
        if index + 1 < len(stream) and stream[index + 1][0] == time:
            continue
        covered = any(start <= time < end for start, end in intervals)
        assert (state == "RUNNING") == covered, (time, intervals)


async def test_a_full_merged_receiver_still_stops_the_old_identity() -> None:
    """A dispatch changing target while running sends a stop for the old identity and a
    start for the new one, both of one dispatch: a full buffer must keep both."""
    counts = DeliveryCounts()
    running: FanOut[Dispatch] = FanOut("running", key=lambda d: d.id, counts=counts)
    receiver = DispatcherInterface._typed_receiver(running, "T", MergeByTypeTarget(), "slow", 1)
    await running.send(announced(core(1, target=TargetIds(1)), running=True, sequence=1))
    await running.send(announced(core(1, target=TargetIds(2)), running=True, sequence=2))
    got = []
    while receiver._pending:  # type: ignore[attr-defined]
        dispatch = await receiver.receive()
        got.append((dispatch.target, dispatch.running("T")))
    # The old identity's start gave way to its stop; the stop stays beside the new start.
    assert got == [(TargetIds(1), RunningState.STOPPED), (TargetIds(2), RunningState.RUNNING)]
    assert counts.coalesced == 1
    # The same identity still coalesces: its newest message is what counts.
    await running.send(announced(core(1, target=TargetIds(2)), running=False, sequence=3))
    await running.send(announced(core(1, target=TargetIds(2)), running=True, sequence=4))
    assert [(await receiver.receive()).running("T")] == [RunningState.RUNNING]
    assert counts.coalesced == 2

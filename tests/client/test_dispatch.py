"""``dispatchd.client.Dispatch``: the frequenz.dispatch surface over the core value."""

from __future__ import annotations

from datetime import timedelta

from frequenz.client.common.microgrid.electrical_components import ElectricalComponentCategory
from frequenz.client.dispatch.recurrence import Frequency as ClientFrequency
from frequenz.client.dispatch.types import TargetCategories

from dispatchd.client import Dispatch, RunningState
from dispatchd.core.messages import Event, Reason
from dispatchd.core.model import Frequency, Recurrence
from tests.client.helpers import announced, at, core


def test_running_uses_the_announcement_even_when_the_schedule_says_otherwise() -> None:
    # Duration 0: the running message's occurrence is over the instant it is
    # read, yet it must read RUNNING so a one-shot actor triggers.
    # ``started`` (the newest frequenz.dispatch's test) agrees with running();
    # ``started_at`` asks the schedule.
    zero = core(duration=0)
    dispatch = announced(zero, running=True, clock_at=10)
    assert dispatch.started
    assert not dispatch.started_at(at(10))
    assert dispatch.running("T") is RunningState.RUNNING
    stopped = announced(zero, running=False, clock_at=10)
    assert stopped.running("T") is RunningState.STOPPED and not stopped.started


def test_running_of_another_type_is_different_type() -> None:
    dispatch = announced(core(type="A"), running=True, clock_at=15)
    assert dispatch.running("B") is RunningState.DIFFERENT_TYPE
    assert dispatch.running("A") is RunningState.RUNNING


def test_without_announcement_running_follows_the_schedule_at_now() -> None:
    one_off = core(start=10, duration=30)
    assert Dispatch(one_off, clock=lambda: at(9)).running("T") is RunningState.STOPPED
    assert Dispatch(one_off, clock=lambda: at(10)).running("T") is RunningState.RUNNING
    assert Dispatch(one_off, clock=lambda: at(39)).running("T") is RunningState.RUNNING
    assert Dispatch(one_off, clock=lambda: at(40)).running("T") is RunningState.STOPPED
    inactive = core(active=False)
    assert Dispatch(inactive, clock=lambda: at(20)).running("T") is RunningState.STOPPED
    deleted = Dispatch(one_off, deleted=True, clock=lambda: at(20))
    assert deleted.running("T") is RunningState.STOPPED


def test_deleted_reads_stopped_even_with_a_running_announcement() -> None:
    base = announced(core(), running=True, clock_at=20)
    assert base.announced is not None
    deleted = Dispatch(base.core, deleted=True, announced=base.announced)
    assert deleted.running("T") is RunningState.STOPPED
    assert not deleted.started


def test_started_follows_a_late_announcement_not_the_clock() -> None:
    # A running message read after its occurrence ended (or on a clock that
    # lags the daemon's) still says: run. The stopped message follows.
    late = announced(core(start=10, duration=30), running=True, clock_at=45)
    assert late.started and not late.started_at(at(45)) and late.started_at(at(20))


def test_a_by_rule_without_frequency_never_runs_in_the_sdk_either() -> None:
    malformed = core(
        start=10, duration=30, recurrence=Recurrence(frequency=Frequency.UNSPECIFIED, byhours=(8,))
    )
    dispatch = Dispatch(malformed, clock=lambda: at(15))
    assert not dispatch.started and not dispatch.started_at(at(10))
    assert dispatch.next_run is None and dispatch.until is None
    assert dispatch.running("T") is RunningState.STOPPED


def test_until_next_run_and_started_use_the_daemons_recurrence() -> None:
    # MINUTELY count 3, duration 10 from 60: occurrences 60, 120, 180.
    rule = Recurrence(frequency=Frequency.MINUTELY, count=3)
    recurring = core(start=60, duration=10, recurrence=rule)

    def read_at(seconds: float) -> Dispatch:
        return Dispatch(recurring, clock=lambda: at(seconds))

    assert read_at(125).started
    assert read_at(125).until == at(130)
    assert read_at(130).until is None
    assert not read_at(130).started
    assert read_at(130).next_run == at(180)
    assert read_at(0).next_run_after(at(120)) == at(120)  # inclusive
    assert read_at(0).next_run_after(at(181)) is None
    assert read_at(200).next_run is None


def test_until_is_none_for_infinite_and_never_raises_for_invalid() -> None:
    infinite = Dispatch(core(duration=None), clock=lambda: at(100))
    assert infinite.started
    assert infinite.until is None
    invalid = core(recurrence=Recurrence(frequency=Frequency.MINUTELY, interval=0))
    for moment in (at(0), at(15), at(100)):
        dispatch = Dispatch(invalid, clock=lambda moment=moment: moment)  # type: ignore[misc]
        assert dispatch.until is None
        assert dispatch.next_run is None
        assert not dispatch.started
        assert dispatch.running("T") is RunningState.STOPPED


def test_until_of_a_running_announcement_is_what_the_daemon_said() -> None:
    dispatch = announced(core(start=10, duration=30), running=True, clock_at=12)
    assert dispatch.announced is not None
    assert dispatch.announced.until is None
    assert dispatch.until is None  # the announcement's value, not recomputed


def test_missed_runs_is_the_reported_tuple_and_callable_with_since() -> None:
    rule = Recurrence(frequency=Frequency.MINUTELY)
    recurring = core(start=60, duration=10, recurrence=rule)
    reported = (at(60), at(120))
    dispatch = Dispatch(recurring, missed_runs=reported, clock=lambda: at(250))
    assert tuple(dispatch.missed_runs) == reported
    assert list(dispatch.missed_runs()) == list(reported)
    assert list(dispatch.missed_runs(at(100))) == [at(120), at(180), at(240)]
    assert list(Dispatch(recurring).missed_runs) == []


def test_fields_alias_and_protobuf_round_trip() -> None:
    rule = Recurrence(frequency=Frequency.DAILY, interval=2, count=5, byhours=(10,))
    value = core(
        42,
        type="PEAK",
        target=TargetCategories(ElectricalComponentCategory.BATTERY),
        payload={"power_w": -5000},
        dry_run=True,
        recurrence=rule,
    )
    dispatch = Dispatch(value)
    assert dispatch.id == 42
    assert dispatch.microgrid_id == 7
    assert dispatch.selector == dispatch.target == value.target
    assert dispatch.payload == {"power_w": -5000}
    assert dispatch.dry_run and dispatch.active and not dispatch.deleted
    assert dispatch.duration == timedelta(seconds=30)
    assert dispatch.recurrence.frequency == ClientFrequency.DAILY
    assert dispatch.recurrence.interval == 2
    assert Dispatch(core(recurrence=None)).recurrence.frequency == ClientFrequency.UNSPECIFIED
    assert dispatch.create_time == value.create_time
    assert dispatch.update_time == value.update_time
    assert dispatch.end_time is None
    assert dispatch.announced is None
    assert dispatch.running_state_change_synced is None
    message = dispatch.to_protobuf()
    assert message.metadata.dispatch_id == 42
    assert Dispatch.from_protobuf(message, 7).core == value


def test_equality_includes_the_announcement() -> None:
    value = core()
    assert Dispatch(value) == Dispatch(value)
    running = announced(value, running=True)
    stopped = announced(value, running=False)
    assert running != stopped
    assert running.announced is not None
    assert running.announced.event is Event.RUNNING
    assert running.announced.reason is Reason.STARTED
    assert len({running, announced(value, running=True)}) == 1

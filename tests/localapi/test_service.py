"""The local API through the official DispatchApiClient, against a real server."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from frequenz.api.common.v1alpha8.pagination.pagination_params_pb2 import PaginationParams
from frequenz.api.common.v1alpha8.types.interval_pb2 import Interval
from frequenz.api.dispatch.v1.dispatch_pb2 import (
    SORT_FIELD_CREATE_TIME,
    SORT_FIELD_LAST_UPDATE_TIME,
    SORT_FIELD_START_TIME,
    SORT_ORDER_ASCENDING,
    SORT_ORDER_DESCENDING,
    CreateMicrogridDispatchRequest,
    DispatchData,
    DispatchFilter,
    ListMicrogridDispatchesRequest,
    RecurrenceRule,
    SortOptions,
    TargetComponents,
)
from frequenz.client.base.conversion import to_timestamp
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.common.microgrid.electrical_components import ElectricalComponentCategory
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.recurrence import EndCriteria, Frequency, Weekday
from frequenz.client.dispatch.recurrence import RecurrenceRule as Rule
from frequenz.client.dispatch.types import (
    BatteryType,
    Dispatch,
    DispatchId,
    Event,
    TargetCategories,
    TargetIds,
)
from google.protobuf.timestamp_pb2 import Timestamp

from dispatchd.localapi import LocalApiServer
from tests.localapi.helpers import assert_rpc_error, soon

MG = MicrogridId(7)
OTHER_MG = MicrogridId(8)

Server = tuple[LocalApiServer, int]


async def all_dispatches(client: DispatchApiClient, **filters: object) -> list[Dispatch]:
    return [d async for page in client.list(MG, **filters) for d in page]  # type: ignore[arg-type]


async def raw_list(client: DispatchApiClient, request: ListMicrogridDispatchesRequest) -> list[int]:
    """Every id across all pages of a raw request (follows next_page_token)."""
    ids: list[int] = []
    while True:
        response = await client.stub.ListMicrogridDispatches(request)
        ids += [d.metadata.dispatch_id for d in response.dispatches]
        if not response.pagination_info.next_page_token:
            return ids
        request.pagination_params.CopyFrom(
            PaginationParams(page_token=response.pagination_info.next_page_token)
        )


async def test_create_get_and_list_round_trip(client: DispatchApiClient) -> None:
    before = datetime.now(UTC)
    start = soon()
    created = await client.create(
        MG,
        "charge",
        start,
        timedelta(minutes=15),
        TargetCategories(BatteryType.LI_ION, ElectricalComponentCategory.INVERTER),
        active=False,
        dry_run=True,
        payload={"power": 10.5, "nested": {"a": [1, 2]}},
    )
    after = datetime.now(UTC)
    assert created.type == "charge"
    assert created.start_time == start
    assert created.duration == timedelta(minutes=15)
    assert created.target == TargetCategories(
        BatteryType.LI_ION, ElectricalComponentCategory.INVERTER
    )
    assert (created.active, created.dry_run) == (False, True)
    assert created.payload == {"power": 10.5, "nested": {"a": [1, 2]}}
    assert before <= created.create_time == created.update_time <= after
    assert created.end_time == start + timedelta(minutes=15)

    fetched = await client.get(microgrid_id=MG, dispatch_id=created.id)
    assert fetched == created
    assert await all_dispatches(client) == [created]


@pytest.mark.parametrize(
    ("rule", "duration", "expected_last_start"),
    [
        (Rule(frequency=Frequency.HOURLY, interval=2, end_criteria=EndCriteria(count=4)), 60, 6),
        (Rule(frequency=Frequency.DAILY, end_criteria=EndCriteria(count=3)), 30, 48),
        (Rule(frequency=Frequency.HOURLY, end_criteria=None), 60, None),
        (Rule(frequency=Frequency.HOURLY, end_criteria=EndCriteria(count=3)), None, None),
    ],
)
async def test_end_time_of_recurring_dispatches(
    client: DispatchApiClient,
    rule: Rule,
    duration: int | None,
    expected_last_start: int | None,
) -> None:
    start = soon().replace(microsecond=0)
    created = await client.create(
        MG,
        "recurring",
        start,
        timedelta(seconds=duration) if duration is not None else None,
        TargetIds(1),
        recurrence=rule,
    )
    if expected_last_start is None:
        assert created.end_time is None
    else:
        assert duration is not None
        last_start = start + timedelta(hours=expected_last_start)
        assert created.end_time == last_start + timedelta(seconds=duration)


async def test_end_time_with_until(client: DispatchApiClient) -> None:
    start = soon().replace(microsecond=0)
    until = start + timedelta(hours=5, minutes=30)
    created = await client.create(
        MG,
        "until",
        start,
        timedelta(minutes=10),
        TargetIds(1),
        recurrence=Rule(frequency=Frequency.HOURLY, end_criteria=EndCriteria(until=until)),
    )
    assert created.end_time == start + timedelta(hours=5, minutes=10)


async def test_start_immediately_uses_server_time(client: DispatchApiClient) -> None:
    before = datetime.now(UTC)
    created = await client.create(MG, "now", "NOW", timedelta(seconds=5), TargetIds(3))
    assert before <= created.start_time <= datetime.now(UTC)
    assert created.end_time == created.start_time + timedelta(seconds=5)


async def test_update_every_field(client: DispatchApiClient) -> None:
    created = await client.create(MG, "upd", soon(), timedelta(minutes=1), TargetIds(1))
    new_start = soon(30)
    updated = await client.update(
        microgrid_id=MG,
        dispatch_id=created.id,
        new_fields={
            "start_time": new_start,
            "duration": timedelta(minutes=5),
            "target": TargetCategories(ElectricalComponentCategory.BATTERY),
            "active": False,
            "payload": {"x": "y"},
            "recurrence.frequency": Frequency.WEEKLY,
            "recurrence.interval": 2,
            "recurrence.end_criteria": EndCriteria(count=4),
            "recurrence.byweekdays": [Weekday.MONDAY, Weekday.FRIDAY],
            "recurrence.byhours": [8],
            "recurrence.byminutes": [15],
            "recurrence.bymonths": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
        },
    )
    assert updated.start_time == new_start
    assert updated.duration == timedelta(minutes=5)
    assert updated.target == TargetCategories(ElectricalComponentCategory.BATTERY)
    assert updated.active is False
    assert updated.payload == {"x": "y"}
    assert updated.recurrence == Rule(
        frequency=Frequency.WEEKLY,
        interval=2,
        end_criteria=EndCriteria(count=4),
        byminutes=[15],
        byhours=[8],
        byweekdays=[Weekday.MONDAY, Weekday.FRIDAY],
        bymonths=list(range(1, 13)),
    )
    assert updated.create_time == created.create_time
    assert updated.update_time > created.update_time
    assert updated.end_time is not None and updated.end_time > new_start
    assert await client.get(microgrid_id=MG, dispatch_id=created.id) == updated

    cleared = await client.update(
        microgrid_id=MG,
        dispatch_id=created.id,
        new_fields={"duration": None, "recurrence.byweekdays": [], "is_active": True},
    )
    assert cleared.duration is None
    assert cleared.end_time is None
    assert cleared.recurrence.byweekdays == []
    assert cleared.active is True


async def test_delete_then_not_found(client: DispatchApiClient) -> None:
    created = await client.create(MG, "del", soon(), None, TargetIds(1))
    await client.delete(microgrid_id=MG, dispatch_id=created.id)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.get(microgrid_id=MG, dispatch_id=created.id)
    assert_rpc_error(error, grpc.StatusCode.NOT_FOUND, str(int(created.id)))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.delete(microgrid_id=MG, dispatch_id=created.id)
    assert_rpc_error(error, grpc.StatusCode.NOT_FOUND)
    assert await all_dispatches(client) == []


async def test_dispatch_of_another_microgrid_is_not_found(client: DispatchApiClient) -> None:
    created = await client.create(MG, "mine", soon(), None, TargetIds(1))
    calls: list[Callable[[], object]] = [
        lambda: client.get(microgrid_id=OTHER_MG, dispatch_id=created.id),
        lambda: client.delete(microgrid_id=OTHER_MG, dispatch_id=created.id),
        lambda: client.update(
            microgrid_id=OTHER_MG, dispatch_id=created.id, new_fields={"is_active": False}
        ),
        lambda: client.get(microgrid_id=MG, dispatch_id=DispatchId(2**64 - 1)),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call()  # type: ignore[misc]
        assert_rpc_error(error, grpc.StatusCode.NOT_FOUND)
    assert await client.get(microgrid_id=MG, dispatch_id=created.id) == created
    assert [d async for page in client.list(OTHER_MG) for d in page] == []


@pytest.fixture
async def population(client: DispatchApiClient) -> list[Dispatch]:
    """A varied set of dispatches in MG (and one in OTHER_MG that must never show)."""
    await client.create(OTHER_MG, "foreign", soon(), None, TargetIds(1))
    specs = [
        ("charge", 10, 60, TargetIds(1, 2), True, False, None),
        ("discharge", 20, None, TargetIds(2, 3), False, False, None),
        ("Fast_Charge", 30, 120, TargetCategories(BatteryType.LI_ION), True, True, None),
        (
            "pv_limit",
            40,
            60,
            TargetCategories(ElectricalComponentCategory.INVERTER),
            True,
            False,
            Rule(frequency=Frequency.DAILY, end_criteria=EndCriteria(count=2)),
        ),
        (
            "foolish bartender",
            50,
            30,
            TargetCategories(ElectricalComponentCategory.BATTERY),
            False,
            True,
            Rule(frequency=Frequency.HOURLY),
        ),
    ]
    created = []
    for kind, minutes, seconds, target, active, dry_run, rule in specs:
        created.append(
            await client.create(
                MG,
                kind,
                soon(minutes),
                timedelta(seconds=seconds) if seconds is not None else None,
                target,
                active=active,
                dry_run=dry_run,
                recurrence=rule,
            )
        )
    return created


def ids(dispatches: list[Dispatch]) -> set[int]:
    return {int(d.id) for d in dispatches}


async def test_filters(client: DispatchApiClient, population: list[Dispatch]) -> None:
    def expect(predicate: Callable[[Dispatch], bool]) -> set[int]:
        return ids([d for d in population if predicate(d)])

    async def got(**filters: object) -> set[int]:
        return ids(await all_dispatches(client, **filters))

    assert await got() == expect(lambda d: True)
    assert await got(active=True) == expect(lambda d: d.active)
    assert await got(active=False) == expect(lambda d: not d.active)
    assert await got(dry_run=True) == expect(lambda d: d.dry_run)
    assert await got(target_components=[TargetIds(3)]) == expect(
        lambda d: isinstance(d.target, TargetIds) and 3 in d.target
    )
    assert await got(target_components=[TargetIds(1), TargetIds(3)]) == expect(
        lambda d: isinstance(d.target, TargetIds) and bool({1, 3} & d.target)
    )
    battery_any = expect(
        lambda d: (
            isinstance(d.target, TargetCategories)
            and any(c.category2 == ElectricalComponentCategory.BATTERY for c in d.target)
        )
    )
    assert len(battery_any) == 2
    assert (
        await got(target_components=[TargetCategories(ElectricalComponentCategory.BATTERY)])
        == battery_any
    )
    assert await got(target_components=[TargetCategories(BatteryType.LI_ION)]) == expect(
        lambda d: (
            isinstance(d.target, TargetCategories)
            and any(c.type == BatteryType.LI_ION for c in d.target)
        )
    )
    middle = population[2].start_time
    assert await got(start_from=middle) == expect(lambda d: d.start_time >= middle)
    assert await got(start_to=middle) == expect(lambda d: d.start_time < middle)
    assert await got(start_from=population[1].start_time, start_to=middle) == {
        int(population[1].id)
    }
    end_mark = population[3].end_time
    assert end_mark is not None
    endless = expect(lambda d: d.end_time is None)
    assert endless  # a recurrence without count or until never ends
    assert await got(end_from=end_mark) == expect(
        lambda d: d.end_time is None or d.end_time >= end_mark
    )
    assert await got(end_to=end_mark) == expect(
        lambda d: d.end_time is not None and d.end_time < end_mark
    )
    assert not endless & await got(end_from=end_mark, end_to=end_mark + timedelta(days=3650))
    picked = [population[0].id, population[4].id, DispatchId(99999)]
    assert await got(dispatch_ids=picked) == {int(population[0].id), int(population[4].id)}
    first = int(population[0].id)
    assert await got(filter_queries=[f"#{first}"]) == {first}
    assert await got(filter_queries=["charge"]) == expect(lambda d: "charge" in d.type.lower())
    assert await got(filter_queries=["bar", "#not_an_id"]) == expect(lambda d: "bar" in d.type)
    assert await got(filter_queries=["foo", "bar"]) == expect(
        lambda d: "foo" in d.type or "bar" in d.type
    )
    assert await got(active=True, filter_queries=["charge"]) == expect(
        lambda d: d.active and "charge" in d.type.lower()
    )


async def test_recurring_and_update_time_filters(
    client: DispatchApiClient, population: list[Dispatch]
) -> None:
    recurring = ids([d for d in population if d.recurrence.frequency != Frequency.UNSPECIFIED])
    assert len(recurring) == 2
    request = ListMicrogridDispatchesRequest(
        microgrid_id=int(MG), filter=DispatchFilter(is_recurring=True)
    )
    assert set(await raw_list(client, request)) == recurring
    request = ListMicrogridDispatchesRequest(
        microgrid_id=int(MG), filter=DispatchFilter(is_recurring=False)
    )
    assert set(await raw_list(client, request)) == ids(population) - recurring

    touched = await client.update(
        microgrid_id=MG, dispatch_id=population[1].id, new_fields={"is_active": True}
    )
    request = ListMicrogridDispatchesRequest(
        microgrid_id=int(MG),
        filter=DispatchFilter(
            update_time_interval=Interval(start_time=to_timestamp(touched.update_time))
        ),
    )
    assert await raw_list(client, request) == [int(touched.id)]


@pytest.mark.parametrize(
    ("field", "attribute"),
    [
        (SORT_FIELD_CREATE_TIME, "create_time"),
        (SORT_FIELD_START_TIME, "start_time"),
        (SORT_FIELD_LAST_UPDATE_TIME, "update_time"),
    ],
)
@pytest.mark.parametrize("order", [SORT_ORDER_ASCENDING, SORT_ORDER_DESCENDING])
async def test_sort_options(
    client: DispatchApiClient, population: list[Dispatch], field: int, attribute: str, order: int
) -> None:
    # Reverse the start times against creation order so the fields disagree.
    current = {int(d.id): d for d in population}
    for index, dispatch in enumerate(population[:3]):
        current[int(dispatch.id)] = await client.update(
            microgrid_id=MG,
            dispatch_id=dispatch.id,
            new_fields={"start_time": soon(200 - index * 10)},
        )
    expected = sorted(
        current.values(),
        key=lambda d: (getattr(d, attribute), int(d.id)),
        reverse=order == SORT_ORDER_DESCENDING,
    )
    request = ListMicrogridDispatchesRequest(
        microgrid_id=int(MG),
        sort_options=SortOptions(sort_field=field, sort_order=order),  # type: ignore[arg-type]
        pagination_params=PaginationParams(page_size=2),
    )
    assert await raw_list(client, request) == [int(d.id) for d in expected]


async def test_default_order_is_newest_first(
    client: DispatchApiClient, population: list[Dispatch]
) -> None:
    listed = await all_dispatches(client)
    assert [d.id for d in listed] == [d.id for d in reversed(population)]


async def test_pagination_across_pages(client: DispatchApiClient) -> None:
    created = [
        await client.create(MG, f"p{i}", soon(i + 1), None, TargetIds(i + 1)) for i in range(23)
    ]
    request = ListMicrogridDispatchesRequest(
        microgrid_id=int(MG), pagination_params=PaginationParams(page_size=5)
    )
    sizes: list[int] = []
    seen: list[int] = []
    while True:
        response = await client.stub.ListMicrogridDispatches(request)
        assert response.pagination_info.total_items == len(created)
        sizes.append(len(response.dispatches))
        seen += [d.metadata.dispatch_id for d in response.dispatches]
        token = response.pagination_info.next_page_token
        if not token:
            break
        request.pagination_params.CopyFrom(PaginationParams(page_token=token))
    assert sizes == [5, 5, 5, 5, 3]
    assert seen == [int(d.id) for d in reversed(created)]

    via_client = [d async for page in client.list(MG, page_size=4) for d in page]
    assert [d.id for d in via_client] == [d.id for d in reversed(created)]


async def test_pagination_is_stable_under_concurrent_changes(client: DispatchApiClient) -> None:
    created = [await client.create(MG, f"s{i}", soon(), None, TargetIds(1)) for i in range(10)]
    request = ListMicrogridDispatchesRequest(
        microgrid_id=int(MG), pagination_params=PaginationParams(page_size=4)
    )
    first = await client.stub.ListMicrogridDispatches(request)
    seen = [d.metadata.dispatch_id for d in first.dispatches]
    # New rows sort before the cursor (newest first); a deleted row simply vanishes.
    newer = [await client.create(MG, f"n{i}", soon(), None, TargetIds(1)) for i in range(3)]
    await client.delete(microgrid_id=MG, dispatch_id=created[0].id)
    request.pagination_params.CopyFrom(
        PaginationParams(page_token=first.pagination_info.next_page_token)
    )
    seen += await raw_list(client, request)
    assert len(seen) == len(set(seen))
    assert seen == [int(d.id) for d in reversed(created[1:])]
    assert not ids(newer) & set(seen)


async def test_bad_page_tokens_are_invalid_argument(client: DispatchApiClient) -> None:
    for i in range(3):
        await client.create(MG, f"t{i}", soon(), None, TargetIds(1))
    request = ListMicrogridDispatchesRequest(
        microgrid_id=int(MG), pagination_params=PaginationParams(page_size=1)
    )
    token = (await client.stub.ListMicrogridDispatches(request)).pagination_info.next_page_token
    assert token
    for bad in ["garbage!", "e30", token[:-3]]:
        request.pagination_params.CopyFrom(PaginationParams(page_token=bad))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.stub.ListMicrogridDispatches(request)
        assert_rpc_error(error, grpc.StatusCode.INVALID_ARGUMENT, "page_token")
    other_filter = ListMicrogridDispatchesRequest(
        microgrid_id=int(MG),
        filter=DispatchFilter(is_active=True),
        pagination_params=PaginationParams(page_token=token),
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.stub.ListMicrogridDispatches(other_filter)
    assert_rpc_error(error, grpc.StatusCode.INVALID_ARGUMENT, "page_token", "filter")
    far = ListMicrogridDispatchesRequest(
        microgrid_id=int(MG),
        filter=DispatchFilter(end_time_interval=Interval(end_time=Timestamp(seconds=-(2**60)))),
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.stub.ListMicrogridDispatches(far)
    assert_rpc_error(error, grpc.StatusCode.INVALID_ARGUMENT, "filter.end_time_interval")


async def test_streams_see_create_update_delete_in_order(
    server: Server, make_client: Callable[[int], DispatchApiClient]
) -> None:
    api, port = server
    first, second = make_client(port), make_client(port)
    receivers = [first.stream(MG), second.stream(MG)]
    await asyncio.wait_for(api.broadcaster.wait_for_subscribers(int(MG), 2), 10)

    await first.create(OTHER_MG, "elsewhere", soon(), None, TargetIds(1))
    created = await first.create(MG, "streamed", soon(), None, TargetIds(1))
    updated = await second.update(
        microgrid_id=MG, dispatch_id=created.id, new_fields={"is_active": False}
    )
    await first.delete(microgrid_id=MG, dispatch_id=created.id)

    for receiver in receivers:
        events = [await asyncio.wait_for(receiver.receive(), 5) for _ in range(3)]
        assert [e.event for e in events] == [Event.CREATED, Event.UPDATED, Event.DELETED]
        assert [e.dispatch for e in events] == [created, updated, updated]


async def test_data_survives_restart(
    database: pathlib.Path, make_client: Callable[[int], DispatchApiClient]
) -> None:
    api = LocalApiServer(listen="127.0.0.1:0", database=database)
    port = await api.start()
    client = make_client(port)
    kept = await client.create(
        MG,
        "persist",
        soon(),
        timedelta(minutes=1),
        TargetIds(4),
        payload={"k": [1, "two"]},
        recurrence=Rule(frequency=Frequency.DAILY, end_criteria=EndCriteria(count=2)),
    )
    gone = await client.create(MG, "gone", soon(), None, TargetIds(4))
    await client.delete(microgrid_id=MG, dispatch_id=gone.id)
    await api.stop(0)
    await api.wait_closed()

    again = LocalApiServer(listen="127.0.0.1:0", database=database)
    port = await again.start()
    try:
        client = make_client(port)
        assert await all_dispatches(client) == [kept]
        fresh = await client.create(MG, "fresh", soon(), None, TargetIds(4))
        assert int(fresh.id) > int(gone.id)
    finally:
        await again.stop(0)


async def test_concurrent_creates_keep_ids_unique(
    server: Server, make_client: Callable[[int], DispatchApiClient], database: pathlib.Path
) -> None:
    clients = [make_client(server[1]) for _ in range(5)]

    async def burst(client: DispatchApiClient, index: int) -> list[Dispatch]:
        return list(
            await asyncio.gather(
                *(
                    client.create(MG, f"c{index}-{n}", soon(), None, TargetIds(index, n))
                    for n in range(40)
                )
            )
        )

    results = await asyncio.gather(*(burst(c, i) for i, c in enumerate(clients)))
    created = [d for batch in results for d in batch]
    assert len(ids(created)) == 200
    listed = await all_dispatches(clients[0])
    assert ids(listed) == ids(created)

    db = sqlite3.connect(database)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT COUNT(*) FROM dispatch_targets").fetchone() == (400 - 5,)
    finally:
        db.close()


def create_request(**data: object) -> CreateMicrogridDispatchRequest:
    """A valid raw create request with some fields replaced."""
    fields: dict[str, object] = {
        "type": "raw",
        "start_time": to_timestamp(soon()),
        "duration": 60,
        "target": TargetComponents(component_ids=TargetComponents.IdSet(ids=[1])),
        "is_active": True,
    }
    fields.update(data)
    return CreateMicrogridDispatchRequest(
        microgrid_id=int(MG),
        dispatch_data=DispatchData(**fields),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"start_time": to_timestamp(datetime.now(UTC) - timedelta(minutes=5))}, "start_time"),
        ({"type": ""}, "type"),
        ({"start_time": Timestamp(seconds=2**62)}, "start_time"),
        ({"start_time": Timestamp(seconds=1, nanos=-5)}, "start_time"),
        ({"type": "   "}, "type"),
        ({"target": None}, "target"),
        ({"target": TargetComponents(component_ids=TargetComponents.IdSet())}, "target"),
        (
            {
                "target": TargetComponents(
                    component_categories_types=TargetComponents.CategoryTypeSet(
                        categories=[TargetComponents.CategoryAndType(category=0)]
                    )
                )
            },
            "target",
        ),
        ({"recurrence": RecurrenceRule(freq=77)}, "recurrence.freq"),  # type: ignore[arg-type]
        ({"recurrence": RecurrenceRule(freq=2, interval=10_001)}, "recurrence.interval"),  # type: ignore[arg-type]
        (
            {
                "recurrence": RecurrenceRule(
                    freq=2,  # type: ignore[arg-type]
                    end_criteria=RecurrenceRule.EndCriteria(count=5000),
                )
            },
            "recurrence.end_criteria.count",
        ),
        (
            {
                "recurrence": RecurrenceRule(
                    freq=2,  # type: ignore[arg-type]
                    end_criteria=RecurrenceRule.EndCriteria(
                        until_time=to_timestamp(datetime.now(UTC))
                    ),
                )
            },
            "recurrence.end_criteria.until_time",
        ),
        ({"recurrence": RecurrenceRule(freq=3, byhours=[24])}, "recurrence.byhours"),  # type: ignore[arg-type]
        ({"recurrence": RecurrenceRule(freq=3, byminutes=[60])}, "recurrence.byminutes"),  # type: ignore[arg-type]
        ({"recurrence": RecurrenceRule(freq=3, bymonths=[13])}, "recurrence.bymonths"),  # type: ignore[arg-type]
        ({"recurrence": RecurrenceRule(freq=3, byweekdays=[0])}, "recurrence.byweekdays"),  # type: ignore[arg-type]
        ({"recurrence": RecurrenceRule(freq=4, bymonthdays=[1])}, "recurrence.bymonthdays"),  # type: ignore[arg-type]
        (
            {"recurrence": RecurrenceRule(freq=1, bymonths=[2], bymonthdays=[30, 31])},  # type: ignore[arg-type]
            "recurrence.bymonthdays",
        ),
    ],
)
async def test_create_validation(
    client: DispatchApiClient, overrides: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.stub.CreateMicrogridDispatch(create_request(**overrides))
    assert_rpc_error(error, grpc.StatusCode.INVALID_ARGUMENT, field)
    assert await all_dispatches(client) == []


async def test_start_time_tolerance_and_missing_microgrid(client: DispatchApiClient) -> None:
    slightly_late = to_timestamp(datetime.now(UTC) - timedelta(seconds=2))
    response = await client.stub.CreateMicrogridDispatch(create_request(start_time=slightly_late))
    assert response.dispatch.metadata.dispatch_id > 0
    request = create_request()
    request.microgrid_id = 0
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.stub.CreateMicrogridDispatch(request)
    assert_rpc_error(error, grpc.StatusCode.INVALID_ARGUMENT, "microgrid_id")


def varint(value: int) -> bytes:
    """Protobuf base-128 varint encoding."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


async def test_negative_duration_is_invalid_argument(server: Server) -> None:
    # uint32 cannot carry a negative number: a client that encodes -5 as a
    # 64-bit varint makes the server see 2**32 - 5, which must be refused.
    data = create_request(duration=None).dispatch_data.SerializeToString()
    data += bytes([3 << 3]) + varint(2**64 - 5)  # field 3 (duration), wire type varint
    raw = bytes([1 << 3]) + varint(int(MG)) + bytes([2 << 3 | 2]) + varint(len(data)) + data
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server[1]}")
    try:
        call = channel.unary_unary(
            "/frequenz.api.dispatch.v1.MicrogridDispatchService/CreateMicrogridDispatch",
            request_serializer=lambda message: message,
            response_deserializer=lambda message: message,
        )
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call(raw, timeout=5)
        assert_rpc_error(error, grpc.StatusCode.INVALID_ARGUMENT, "duration")
    finally:
        await channel.close()


async def test_update_validation(client: DispatchApiClient) -> None:
    created = await client.create(MG, "v", soon(), timedelta(minutes=1), TargetIds(1))
    cases: list[tuple[dict[str, object], str]] = [
        ({"start_time": datetime.now(UTC) - timedelta(hours=1)}, "start_time"),
        ({"target": TargetIds()}, "target"),
        (
            {"recurrence.frequency": Frequency.DAILY, "recurrence.interval": 20_000},
            "recurrence.interval",
        ),
        (
            {"recurrence.frequency": Frequency.DAILY, "recurrence.byhours": [30]},
            "recurrence.byhours",
        ),
    ]
    for fields, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.update(microgrid_id=MG, dispatch_id=created.id, new_fields=fields)
        assert_rpc_error(error, grpc.StatusCode.INVALID_ARGUMENT, field)

    from frequenz.api.dispatch.v1.dispatch_pb2 import UpdateMicrogridDispatchRequest

    for paths, words in [
        (["no_such_field"], ("update_mask", "no_such_field")),
        (["type"], ("type", "cannot be updated")),
        (["is_dry_run"], ("is_dry_run",)),
        ([], ("update_mask",)),
    ]:
        request = UpdateMicrogridDispatchRequest(microgrid_id=int(MG), dispatch_id=int(created.id))
        request.update_mask.paths.extend(paths)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.stub.UpdateMicrogridDispatch(request)
        assert_rpc_error(error, grpc.StatusCode.INVALID_ARGUMENT, *words)
    assert await client.get(microgrid_id=MG, dispatch_id=created.id) == created

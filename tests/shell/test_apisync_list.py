"""ApiSync's listing over a real local API: every page, the same values as the client's list."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from frequenz.api.dispatch.v1.dispatch_pb2 import DispatchData, RecurrenceRule
from frequenz.client.base.conversion import to_timestamp
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch import DispatchApiClient

from dispatchd.apisync import ApiSync, SyncItem
from dispatchd.core.model import Dispatch
from dispatchd.localapi.server import LocalApiServer
from dispatchd.localapi.storage import Storage
from dispatchd.localapi.validation import prepare_create

MICROGRID = 5
COUNT = 230
PAGE = 40


def _seed(database: Path) -> None:
    now = datetime(2026, 11, 23, 12, 0, 0, 250000, tzinfo=UTC)
    storage = Storage(database)
    try:
        for n in range(COUNT):
            data = DispatchData(type=f"T{n % 3}", duration=60 + n, is_active=n % 5 != 0)
            data.start_time.CopyFrom(to_timestamp(now + timedelta(minutes=n, microseconds=n)))
            if n % 2:
                data.target.component_ids.ids.extend([n, n + 1])
            else:
                data.target.component_categories.categories.extend([1])
            data.payload.update({"n": n, "nested": {"x": [1.5, "é", None]}})
            if n % 4 == 0:
                data.recurrence.freq = RecurrenceRule.FREQUENCY_DAILY
                data.recurrence.end_criteria.count = 3
            storage.create(MICROGRID, prepare_create(data, start_immediately=False, now=now), now)
    finally:
        storage.close()


async def test_list_reads_every_page_and_equals_the_clients_list(tmp_path: Path) -> None:
    database = tmp_path / "dispatches.sqlite3"
    _seed(database)
    server = LocalApiServer(listen="127.0.0.1:0", database=database)
    port = await server.start()
    client = DispatchApiClient(server_url=f"grpc://127.0.0.1:{port}?ssl=false", auth_key="k")
    try:
        delivered: list[SyncItem] = []

        async def deliver(item: SyncItem) -> None:
            delivered.append(item)

        listed = await ApiSync(client, MICROGRID, deliver, page_size=PAGE)._list()
        expected: list[Dispatch] = []
        async for page in client.list(MicrogridId(MICROGRID), page_size=PAGE):
            expected.extend(Dispatch.from_client(d, MICROGRID) for d in page)
        assert len(expected) == COUNT
        assert listed.microgrid_id == MICROGRID
        assert listed.initial
        assert listed.dispatches == tuple(expected)
        assert len({d.id for d in listed.dispatches}) == COUNT
        assert any(d.recurrence is not None for d in listed.dispatches)
    finally:
        await client.disconnect()
        await server.stop(0)

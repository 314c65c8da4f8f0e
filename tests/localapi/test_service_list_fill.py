"""The list response written in place equals one built from ``StoredDispatch.to_protobuf``."""

from __future__ import annotations

from frequenz.api.dispatch.v1.dispatch_pb2 import DispatchData, ListMicrogridDispatchesResponse

from dispatchd.localapi.service import _fill_dispatches
from dispatchd.localapi.storage import StoredDispatch


def _stored(n: int, end_micros: int | None) -> StoredDispatch:
    data = DispatchData(type=f"T{n}", duration=60 + n, is_active=True)
    data.target.component_ids.ids.extend([n])
    data.payload.update({"n": n})
    return StoredDispatch(
        id=n,
        microgrid_id=3,
        data=data,
        create_micros=1_700_000_000_123_456 + n,
        update_micros=-1_500_001 + n,  # before the epoch: negative seconds, positive nanos
        end_micros=end_micros,
    )


def test_filled_response_equals_the_one_from_to_protobuf() -> None:
    stored = [_stored(1, None), _stored(2, 1_800_000_000_000_001), _stored(3, 0)]
    filled = ListMicrogridDispatchesResponse()
    _fill_dispatches(filled, stored)
    built = ListMicrogridDispatchesResponse(dispatches=[s.to_protobuf() for s in stored])
    assert filled == built
    assert filled.SerializeToString(deterministic=True) == built.SerializeToString(
        deterministic=True
    )
    assert not filled.dispatches[0].metadata.HasField("end_time")
    assert filled.dispatches[2].metadata.HasField("end_time")

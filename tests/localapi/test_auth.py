"""Key and HMAC authentication, through the official client and hand-made metadata."""

from __future__ import annotations

import asyncio
import base64
import hmac
import pathlib
import secrets
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
import structlog.testing
from frequenz.api.dispatch.v1 import dispatch_pb2_grpc
from frequenz.api.dispatch.v1.dispatch_pb2 import ListMicrogridDispatchesRequest
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.types import Event, TargetIds

from dispatchd.localapi import LocalApiServer
from dispatchd.localapi.auth import (
    REJECTION_LOG_INTERVAL_SECONDS,
    Authenticator,
    AuthError,
    RateLimit,
)
from tests.localapi.helpers import AUTH_KEY, SIGN_SECRET, assert_rpc_error, soon

MG = MicrogridId(3)
LIST_METHOD = "/frequenz.api.dispatch.v1.MicrogridDispatchService/ListMicrogridDispatches"


@pytest.fixture
async def signed_server(tmp_path: pathlib.Path) -> AsyncIterator[tuple[LocalApiServer, int]]:
    api = LocalApiServer(
        listen="127.0.0.1:0",
        database=tmp_path / "auth.sqlite3",
        auth_keys=[AUTH_KEY, "second-key"],
        sign_secret=SIGN_SECRET,
    )
    port = await api.start()
    yield api, port
    await api.stop(0)


@pytest.fixture
async def keyed_server(tmp_path: pathlib.Path) -> AsyncIterator[int]:
    api = LocalApiServer(
        listen="127.0.0.1:0", database=tmp_path / "key.sqlite3", auth_keys=[AUTH_KEY]
    )
    port = await api.start()
    yield port
    await api.stop(0)


def signature(secret: str, key: str, ts: str, nonce: str, method: str) -> str:
    """What frequenz-client-base's signing interceptor computes."""
    digest = hmac.new(secret.encode(), digestmod="sha256")
    for part in (key, ts, nonce, method.split("/")[-1]):
        digest.update(part.encode())
    return base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")


def signed_metadata(
    *, key: str = AUTH_KEY, secret: str = SIGN_SECRET, ts: int | None = None
) -> tuple[tuple[str, str], ...]:
    stamp = str(int(time.time()) if ts is None else ts)
    nonce = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode()
    sig = signature(secret, key, stamp, nonce, LIST_METHOD)
    return (("key", key), ("ts", stamp), ("nonce", nonce), ("sig", sig))


async def raw_list(port: int, metadata: tuple[tuple[str, str], ...]) -> int:
    """A List call with exactly this metadata; returns total_items."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = dispatch_pb2_grpc.MicrogridDispatchServiceStub(channel)
        response = await stub.ListMicrogridDispatches(
            ListMicrogridDispatchesRequest(microgrid_id=int(MG)), metadata=metadata, timeout=5
        )
        return int(response.pagination_info.total_items)


async def test_signed_client_can_do_everything(
    signed_server: tuple[LocalApiServer, int], make_client: Callable[..., DispatchApiClient]
) -> None:
    api, port = signed_server
    client = make_client(port, auth_key="second-key", sign_secret=SIGN_SECRET)
    receiver = client.stream(MG)
    await asyncio.wait_for(api.broadcaster.wait_for_subscribers(int(MG), 1), 10)
    created = await client.create(MG, "signed", soon(), None, TargetIds(1))
    assert await client.get(microgrid_id=MG, dispatch_id=created.id) == created
    assert [d.id async for page in client.list(MG) for d in page] == [created.id]
    event = await asyncio.wait_for(receiver.receive(), 5)
    assert (event.event, event.dispatch) == (Event.CREATED, created)


async def test_key_only_server(
    keyed_server: int, make_client: Callable[..., DispatchApiClient]
) -> None:
    assert await raw_list(keyed_server, (("key", AUTH_KEY),)) == 0
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await raw_list(keyed_server, ())
    assert_rpc_error(error, grpc.StatusCode.UNAUTHENTICATED, "missing key")
    wrong = make_client(keyed_server, auth_key="wrong-key")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await wrong.create(MG, "x", soon(), None, TargetIds(1))
    assert_rpc_error(error, grpc.StatusCode.UNAUTHENTICATED, "not accepted")


async def test_wrong_key_or_secret_is_rejected(
    signed_server: tuple[LocalApiServer, int], make_client: Callable[..., DispatchApiClient]
) -> None:
    _api, port = signed_server
    wrong_secret = make_client(port, sign_secret="not-the-secret")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await wrong_secret.get(microgrid_id=MG, dispatch_id=1)  # type: ignore[arg-type]
    assert_rpc_error(error, grpc.StatusCode.UNAUTHENTICATED, "bad signature")
    unsigned = make_client(port)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await unsigned.get(microgrid_id=MG, dispatch_id=1)  # type: ignore[arg-type]
    assert_rpc_error(error, grpc.StatusCode.UNAUTHENTICATED, "signature")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await raw_list(port, signed_metadata(key="intruder"))
    assert_rpc_error(error, grpc.StatusCode.UNAUTHENTICATED, "not accepted")


async def test_tampered_method_is_a_bad_signature(
    signed_server: tuple[LocalApiServer, int],
) -> None:
    _api, port = signed_server
    metadata = dict(signed_metadata())
    # Signed for Get, sent to List.
    metadata["sig"] = signature(
        SIGN_SECRET, AUTH_KEY, metadata["ts"], metadata["nonce"], "GetMicrogridDispatch"
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await raw_list(port, tuple(metadata.items()))
    assert_rpc_error(error, grpc.StatusCode.UNAUTHENTICATED, "bad signature")


async def test_stale_timestamp(signed_server: tuple[LocalApiServer, int]) -> None:
    _api, port = signed_server
    for skew in (-400, 400):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await raw_list(port, signed_metadata(ts=int(time.time()) + skew))
        assert_rpc_error(error, grpc.StatusCode.UNAUTHENTICATED, "stale")
    assert await raw_list(port, signed_metadata(ts=int(time.time()) - 60)) == 0


async def test_replayed_nonce(signed_server: tuple[LocalApiServer, int]) -> None:
    _api, port = signed_server
    metadata = signed_metadata()
    assert await raw_list(port, metadata) == 0
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await raw_list(port, metadata)
    assert_rpc_error(error, grpc.StatusCode.UNAUTHENTICATED, "replayed")
    assert await raw_list(port, signed_metadata()) == 0


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"ts": "12ab"}, "malformed ts"),
        ({"nonce": ""}, "nonce"),
        ({"sig": "AAAA"}, "bad signature"),
    ],
)
def test_malformed_signature_metadata(change: dict[str, str], reason: str) -> None:
    authenticator = Authenticator(auth_keys=[], sign_secret=SIGN_SECRET)
    metadata = dict(signed_metadata())
    metadata.update(change)
    with pytest.raises(AuthError, match=reason):
        authenticator.check(LIST_METHOD, tuple(metadata.items()))


def test_nonces_are_forgotten_after_the_window() -> None:
    now = [1_000_000.0]
    authenticator = Authenticator(
        auth_keys=[], sign_secret=SIGN_SECRET, max_skew=300, clock=lambda: now[0]
    )
    stamp = str(int(now[0]))
    nonce = "n-1"
    sig = signature(SIGN_SECRET, AUTH_KEY, stamp, nonce, LIST_METHOD)
    metadata = (("key", AUTH_KEY), ("ts", stamp), ("nonce", nonce), ("sig", sig))
    authenticator.check(LIST_METHOD, metadata)
    with pytest.raises(AuthError, match="replayed"):
        authenticator.check(LIST_METHOD, metadata)
    now[0] += 301
    # Outside the window the timestamp is stale anyway, so the nonce can go.
    with pytest.raises(AuthError, match="stale"):
        authenticator.check(LIST_METHOD, metadata)
    fresh_stamp = str(int(now[0]))
    fresh = (
        ("key", AUTH_KEY),
        ("ts", fresh_stamp),
        ("nonce", "n-2"),
        ("sig", signature(SIGN_SECRET, AUTH_KEY, fresh_stamp, "n-2", LIST_METHOD)),
    )
    authenticator.check(LIST_METHOD, fresh)
    assert authenticator.remembered_nonces == 1


def test_rate_limit_lets_one_through_per_interval_and_counts_the_rest() -> None:
    now = [100.0]
    limit = RateLimit(10.0, clock=lambda: now[0])
    assert limit.allow() == 0
    held = [limit.allow() for _ in range(5)]
    assert held == [None] * 5
    now[0] += 9.9
    assert limit.allow() is None
    now[0] += 0.1
    assert limit.allow() == 6
    assert limit.allow() is None


async def test_repeated_rejections_are_logged_at_a_bounded_rate(keyed_server: int) -> None:
    calls = 20
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        for _ in range(calls):
            with pytest.raises(grpc.aio.AioRpcError):
                await raw_list(keyed_server, (("key", "wrong-key"),))
    elapsed = time.monotonic() - started
    rejected = [entry for entry in logs if entry["event"] == "call rejected"]
    assert rejected[0]["reason"] == "key not accepted" and rejected[0]["suppressed"] == 0
    assert rejected[0]["log_level"] == "warning"
    # One line per REJECTION_LOG_INTERVAL_SECONDS (10 s), however slow the machine is.
    assert len(rejected) <= 1 + elapsed // REJECTION_LOG_INTERVAL_SECONDS
    assert len(rejected) + sum(entry["suppressed"] for entry in rejected) <= calls

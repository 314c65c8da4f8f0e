"""Authentication of calls: an accepted ``key`` and, optionally, an HMAC signature.

The signature is the one ``frequenz-client-base`` computes: HMAC-SHA256 over
key, ``ts`` (decimal seconds), ``nonce`` (as sent, URL-safe base64) and the
method name (last path segment), sent as URL-safe base64 without padding in
``sig``. A signed call is accepted once: its nonce is remembered for the
validity window, so replays and stale timestamps are rejected.
"""

from __future__ import annotations

import base64
import hmac
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import grpc.aio
import structlog

_log = structlog.get_logger(__name__)

DEFAULT_MAX_SKEW_SECONDS = 300.0
MAX_NONCE_LENGTH = 128
REJECTION_LOG_INTERVAL_SECONDS = 10.0
"""At most one "call rejected" line per this many seconds; the others are counted."""


class AuthError(Exception):
    """Why a call is not authenticated (the message goes back to the client)."""


class NonceStore:
    """Nonces seen within the validity window; older ones are forgotten."""

    def __init__(self) -> None:
        self._expiry: dict[str, float] = {}
        self._next_prune = 0.0

    def add(self, nonce: str, expires: float, now: float) -> bool:
        """Remember the nonce; ``False`` if it was already seen (a replay)."""
        if now >= self._next_prune:
            self._expiry = {seen: until for seen, until in self._expiry.items() if until > now}
            self._next_prune = now + 1.0
        previous = self._expiry.get(nonce)
        if previous is not None and previous > now:
            return False
        self._expiry[nonce] = expires
        return True

    def __len__(self) -> int:
        return len(self._expiry)


class Authenticator:
    """Decides whether call metadata is acceptable; pure except for the nonce memory."""

    def __init__(
        self,
        *,
        auth_keys: Sequence[str],
        sign_secret: str,
        max_skew: float = DEFAULT_MAX_SKEW_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = [key.encode() for key in auth_keys]
        self._secret = sign_secret.encode()
        self._max_skew = max_skew
        self._clock = clock
        self._nonces = NonceStore()

    @property
    def enabled(self) -> bool:
        """Whether any check applies at all."""
        return bool(self._keys or self._secret)

    @property
    def remembered_nonces(self) -> int:
        """How many nonces are held (bounded by the request rate times the window)."""
        return len(self._nonces)

    def check(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        """Raise :class:`AuthError` unless the call may proceed."""
        values = _metadata_dict(metadata)
        key = values.get("key")
        if self._keys:
            if key is None:
                raise AuthError("missing key metadata")
            if not any(hmac.compare_digest(key.encode(), accepted) for accepted in self._keys):
                raise AuthError("key not accepted")
        if self._secret:
            self._check_signature(method, key, values)

    def _check_signature(self, method: str, key: str | None, values: dict[str, str]) -> None:
        if key is None:
            raise AuthError("signed calls need a key metadata")
        ts, nonce, sig = values.get("ts"), values.get("nonce"), values.get("sig")
        if ts is None or nonce is None or sig is None:
            raise AuthError("missing signature metadata (ts, nonce, sig)")
        if not ts.isascii() or not ts.isdigit() or len(ts) > 12:
            raise AuthError("malformed ts metadata")
        if not nonce or len(nonce) > MAX_NONCE_LENGTH:
            raise AuthError("malformed nonce metadata")
        digest = hmac.new(self._secret, digestmod="sha256")
        for part in (key, ts, nonce, method.split("/")[-1]):
            digest.update(part.encode())
        expected = base64.urlsafe_b64encode(digest.digest()).strip(b"=")
        if not hmac.compare_digest(expected, sig.encode()):
            raise AuthError("bad signature")
        now = self._clock()
        if abs(now - int(ts)) > self._max_skew:
            raise AuthError(f"stale timestamp (more than {self._max_skew:g}s from server time)")
        if not self._nonces.add(nonce, int(ts) + self._max_skew, now):
            raise AuthError("replayed nonce")


def _metadata_dict(metadata: Sequence[tuple[str, str | bytes]]) -> dict[str, str]:
    """First value of each text key; binary values are ignored."""
    values: dict[str, str] = {}
    for name, value in metadata:
        if isinstance(value, str):
            values.setdefault(name.lower(), value)
    return values


class RateLimit:
    """Lets one event through per ``interval`` seconds and counts the ones held back.

    A client retrying with a wrong key, or a scan, must not flood the log;
    the count on the next line still says how much happened.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next_allowed: float | None = None
        self._held_back = 0

    def allow(self) -> int | None:
        """``None`` to stay quiet; else how many events were held back since the last one."""
        now = self._clock()
        if self._next_allowed is not None and now < self._next_allowed:
            self._held_back += 1
            return None
        held_back, self._held_back = self._held_back, 0
        self._next_allowed = now + self.interval
        return held_back


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Rejects unauthenticated calls with UNAUTHENTICATED before any handler runs."""

    def __init__(self, authenticator: Authenticator, rate_limit: RateLimit | None = None) -> None:
        self._authenticator = authenticator
        self._rate_limit = rate_limit or RateLimit(REJECTION_LOG_INTERVAL_SECONDS)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],  # type: ignore[type-arg]
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        try:
            self._authenticator.check(method, tuple(handler_call_details.invocation_metadata))
        except AuthError as error:
            held_back = self._rate_limit.allow()
            if held_back is not None:
                _log.warning(
                    "call rejected",
                    method=method,
                    reason=str(error),
                    suppressed=held_back,
                    log_interval_seconds=self._rate_limit.interval,
                )
            return _denial(handler, str(error))
        return handler


def _denial(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
    """A handler of the same shape that only aborts with UNAUTHENTICATED."""

    async def deny(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        # A generator, so wrappers that iterate the stream handler see one.
        await deny(request, context)
        return
        yield

    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            deny_stream, request_deserializer=handler.request_deserializer
        )
    return grpc.unary_unary_rpc_method_handler(
        deny, request_deserializer=handler.request_deserializer
    )

"""Requests protobuf cannot parse get INVALID_ARGUMENT, not INTERNAL plus a traceback.

gRPC parses the request before any handler or interceptor code sees it and
reports a parse error as an unexpected exception of the servicer. This
interceptor gives every handler a deserializer that returns the parse error
instead of raising it, and a behaviour that answers it with INVALID_ARGUMENT.
It is the outermost interceptor, so this holds before authentication too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import grpc.aio
import structlog

_log = structlog.get_logger(__name__)

if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True, slots=True)
class _Undecodable:
    """What the tolerant deserializer returns for bytes it cannot parse."""

    reason: str


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Answers undecodable unary requests with INVALID_ARGUMENT."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        return _guarded(handler, handler_call_details.method)


def _guarded(handler: Handler, method: str) -> Handler:
    parse: Any = handler.request_deserializer

    def tolerant(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception as error:  # any parse failure is the client's
            return _Undecodable(f"{type(error).__name__}: {error}")

    async def reject(undecodable: _Undecodable, context: Context) -> None:
        _log.info("request rejected", method=method, reason=undecodable.reason)
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"request cannot be parsed: {undecodable.reason}"
        )

    if handler.response_streaming:
        stream: Any = handler.unary_stream

        async def unary_stream(request: Any, context: Context) -> Any:
            if isinstance(request, _Undecodable):
                await reject(request, context)
            async for item in stream(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(
            unary_stream,
            request_deserializer=tolerant,
            response_serializer=handler.response_serializer,
        )
    unary: Any = handler.unary_unary

    async def unary_unary(request: Any, context: Context) -> Any:
        if isinstance(request, _Undecodable):
            await reject(request, context)
        return await unary(request, context)

    return grpc.unary_unary_rpc_method_handler(
        unary_unary,
        request_deserializer=tolerant,
        response_serializer=handler.response_serializer,
    )

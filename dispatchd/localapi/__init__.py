"""The local dispatch API: ``MicrogridDispatchService`` over gRPC, kept in SQLite."""

from dispatchd.localapi.server import LocalApiServer

__all__ = ["LocalApiServer"]

"""Shared test helpers for the local API tests."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from frequenz.client.dispatch import DispatchApiClient

AUTH_KEY = "test-key"
SIGN_SECRET = "test-secret"

MakeClient = Callable[..., DispatchApiClient]


def soon(minutes: float = 10) -> datetime:
    """A start time safely in the future."""
    return datetime.now(UTC) + timedelta(minutes=minutes)


def assert_rpc_error(
    error: pytest.ExceptionInfo[grpc.aio.AioRpcError], code: grpc.StatusCode, *words: str
) -> None:
    """The call failed with ``code`` and its message names every word."""
    assert error.value.code() == code, error.value
    details = error.value.details() or ""
    for word in words:
        assert word in details, (word, details)

"""Fixtures for SDK tests against a real in-process dispatchd and RabbitMQ."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.shell.daemon_harness import DaemonHandle, QueueObserver, running_daemon


@pytest.fixture
def exchange() -> str:
    """An exchange of the test's own, so parallel tests never see each other."""
    return f"sdk.{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def observer(amqp_url: str, exchange: str) -> AsyncIterator[QueueObserver]:
    """Everything the daemon publishes (bound before it starts); removes the exchange after."""
    async with QueueObserver(amqp_url, exchange) as watching:
        yield watching


@pytest.fixture
async def daemon(
    tmp_path: Path, amqp_url: str, exchange: str, observer: QueueObserver
) -> AsyncIterator[DaemonHandle]:
    """A ready dispatchd syncing microgrid 7 from its embedded local API."""
    async with running_daemon(tmp_path / "state", amqp_url, exchange) as handle:
        yield handle

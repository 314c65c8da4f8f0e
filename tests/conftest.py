"""Shared fixtures. RabbitMQ is a hard requirement: CI starts it, so a missing broker fails."""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
from hypothesis import settings

# CI (.ci/run sets HYPOTHESIS_PROFILE=ci) replays the same examples every run,
# so a gate never fails on a newly drawn case; local runs keep drawing new ones
# (a local run found the rule that took 17 s to build, see test_recurrence_grid).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The test broker's URL (``TEST_AMQP_URL`` or the local default), checked reachable.

    Never skips: a test that needs the broker and cannot reach it fails with
    a message saying how to start it.
    """
    url = os.environ.get("TEST_AMQP_URL", DEFAULT_AMQP_URL)
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5672
    try:
        with socket.create_connection((host, port), timeout=5):
            pass
    except OSError as exc:
        pytest.fail(
            f"RabbitMQ is not reachable at {host}:{port} ({exc}); start it with "
            "'rabbitmq-server -detached' (.ci/run does) or set TEST_AMQP_URL",
            pytrace=False,
        )
    return url


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Names for exchanges and queues that no other test or run can collide with."""

    def make(prefix: str) -> str:
        return f"{prefix}.{request.node.name[:40]}.{uuid.uuid4().hex[:12]}"

    return make


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """``os.environ`` without any ``DISPATCHD_*`` variable, also as a dict for subprocesses."""
    for name in list(os.environ):
        if name.upper().startswith("DISPATCHD_"):
            monkeypatch.delenv(name)
    yield dict(os.environ)


DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The test PostgreSQL server's URL (``TEST_POSTGRES_URL`` or the local default).

    Like the broker, never skipped: .ci/run starts the server.
    """
    url = os.environ.get("TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5432
    try:
        with socket.create_connection((host, port), timeout=5):
            pass
    except OSError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {host}:{port} ({exc}); .ci/run starts it "
            "(or set TEST_POSTGRES_URL)",
            pytrace=False,
        )
    return url


@pytest.fixture
async def postgres_url(postgres_server: str) -> AsyncIterator[str]:
    """A new, empty database for this test only (dropped afterwards); its URL."""
    async with temporary_database(postgres_server) as url:
        yield url


@contextlib.asynccontextmanager
async def temporary_database(server: str) -> AsyncIterator[str]:
    """Create a database with a random name on ``server``, yield its URL, drop it."""
    import asyncpg

    name = f"dispatchd_test_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield urlunsplit(urlsplit(server)._replace(path=f"/{name}"))
    finally:
        admin = await asyncpg.connect(server)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

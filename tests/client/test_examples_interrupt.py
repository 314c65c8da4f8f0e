"""Ctrl-C stops the examples quietly, as people stop them: no traceback, status 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Iterator

import pytest

from tests.client.helpers import ROOT
from tests.shell.daemon_harness import MG, DaemonHandle


@pytest.fixture
def sigint_handled_here() -> Iterator[None]:
    """Start the example with SIGINT at its default, as a terminal does.

    A test run launched in the background by a shell without job control
    inherits SIGINT ignored, and an ignored signal stays ignored across exec:
    the example would then never see KeyboardInterrupt. A handled signal is
    reset to its default by exec, so the test process handles it while the
    example starts. (A preexec_fn would do the same in the child, but forking
    with gRPC's threads running is unsafe: the child died before exec.)
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    "name", ["lifecycle_printer.py", "running_state_actor.py", "managed_actor.py"]
)
@pytest.mark.usefixtures("sigint_handled_here")
async def test_ctrl_c_exits_quietly(
    name: str, amqp_url: str, exchange: str, daemon: DaemonHandle
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / name),
        *("--microgrid", str(MG), "--amqp-url", amqp_url, "--exchange", exchange),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert process.stdout is not None
    async with asyncio.timeout(20):
        ready = await process.stdout.readline()
    assert ready.startswith(b"ready"), ready
    process.send_signal(signal.SIGINT)
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert (process.returncode, out) == (0, b""), err
    # (frequenz-client-common's import-time "Prefix 'CID'" notice may precede; not ours)
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err

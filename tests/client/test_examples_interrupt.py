"""Ctrl-C stops the examples quietly, as people stop them: no traceback, status 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest

from tests.client.helpers import ROOT
from tests.shell.daemon_harness import MG, DaemonHandle


def _ctrl_c_as_in_a_terminal() -> None:
    """SIGINT at its default in the example, as a terminal starts it.

    A test run launched in the background by a shell without job control
    inherits SIGINT ignored, and so would the example: Python then never
    raises KeyboardInterrupt, and the example would rightly keep running.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    "name", ["lifecycle_printer.py", "running_state_actor.py", "managed_actor.py"]
)
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
        preexec_fn=_ctrl_c_as_in_a_terminal,
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

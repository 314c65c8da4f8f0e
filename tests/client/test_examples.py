"""The examples run as actors would run them: subprocesses against a real dispatchd."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from frequenz.client.dispatch.types import TargetIds

from tests.client.receiver_helpers import create
from tests.shell.daemon_harness import MG, DaemonHandle, mg, soon

ROOT = Path(__file__).resolve().parents[2]


async def start_example(
    name: str, amqp_url: str, exchange: str, *args: str
) -> asyncio.subprocess.Process:
    """Run ``examples/<name>`` and wait until it says it is ready."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / name),
        "--microgrid",
        str(MG),
        "--amqp-url",
        amqp_url,
        "--exchange",
        exchange,
        "--timeout",
        "30",
        *args,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None
    async with asyncio.timeout(20):
        ready = await process.stdout.readline()
    assert ready.startswith(b"ready"), ready
    return process


async def output_of(process: asyncio.subprocess.Process) -> list[str]:
    """The rest of its output; it must exit by itself, successfully."""
    assert process.stdout is not None
    async with asyncio.timeout(30):
        out = await process.stdout.read()
        code = await process.wait()
    assert code == 0, out
    return out.decode().splitlines()


async def test_lifecycle_printer(amqp_url: str, exchange: str, daemon: DaemonHandle) -> None:
    process = await start_example("lifecycle_printer.py", amqp_url, exchange, "--count", "3")
    created = await create(daemon.client, "DEMO", start_in=600, payload={"p": "one"})
    await daemon.client.update(
        microgrid_id=mg(), dispatch_id=created.id, new_fields={"payload": {"p": "two"}}
    )
    await daemon.client.delete(microgrid_id=mg(), dispatch_id=created.id)
    assert await output_of(process) == [
        f"created id={int(created.id)} type=DEMO",
        f"updated id={int(created.id)} type=DEMO payload={{'p': 'two'}}",
        f"deleted id={int(created.id)} type=DEMO",
    ]


async def test_running_state_actor(amqp_url: str, exchange: str, daemon: DaemonHandle) -> None:
    process = await start_example(
        "running_state_actor.py", amqp_url, exchange, "--type", "DEMO", "--count", "2"
    )
    await create(daemon.client, "OTHER", start_in=0.2, duration=0.2)
    demo = await daemon.client.create(
        mg(), "DEMO", soon(0.3), None, TargetIds(4), payload={"mode": "peak"}
    )
    assert process.stdout is not None
    async with asyncio.timeout(10):
        first = (await process.stdout.readline()).decode()
    assert first.startswith(f"RUNNING id={int(demo.id)} type=DEMO ")
    assert "payload={'mode': 'peak'}" in first and "until=None" in first
    await daemon.client.delete(microgrid_id=mg(), dispatch_id=demo.id)
    assert await output_of(process) == [f"STOPPED id={int(demo.id)} type=DEMO"]


async def test_example_times_out_with_status_1(
    amqp_url: str, exchange: str, daemon: DaemonHandle
) -> None:
    process = await start_example("lifecycle_printer.py", amqp_url, exchange, "--timeout", "0.5")
    async with asyncio.timeout(20):
        assert await process.wait() == 1


async def test_managed_actor(amqp_url: str, exchange: str, daemon: DaemonHandle) -> None:
    process = await start_example(
        "managed_actor.py", amqp_url, exchange, "--type", "PEAK", "--count", "3"
    )
    peak = await daemon.client.create(
        mg(), "PEAK", soon(0.3), None, TargetIds(4), payload={"mode": "hard"}
    )
    assert process.stdout is not None
    async with asyncio.timeout(10):
        first = (await process.stdout.readline()).decode()
    assert first.startswith(f"started target={TargetIds(4)} ")
    assert "options={'mode': 'hard'}" in first and "until=None" in first
    await daemon.client.update(
        microgrid_id=mg(), dispatch_id=peak.id, new_fields={"payload": {"mode": "soft"}}
    )
    async with asyncio.timeout(10):
        second = (await process.stdout.readline()).decode()
    assert second.startswith("reconfigured ") and "options={'mode': 'soft'}" in second
    await daemon.client.delete(microgrid_id=mg(), dispatch_id=peak.id)
    assert await output_of(process) == [f"stopped target={TargetIds(4)}"]


async def test_the_example_unit_tests_pass_with_the_fake_dispatcher() -> None:
    """``examples/test_*.py`` run as the docs say (``pytest examples/...``), no broker needed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        *sorted(str(path) for path in (ROOT / "examples").glob("test_*.py")),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    async with asyncio.timeout(60):
        out, _ = await process.communicate()
    assert process.returncode == 0, out.decode()
    assert b" passed" in out and b"failed" not in out, out.decode()

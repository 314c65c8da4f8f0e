"""The official ``dispatch-cli`` as a subprocess against a real server."""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import sys
from collections.abc import Callable
from datetime import timedelta

import pytest
from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.types import TargetIds

from dispatchd.localapi import LocalApiServer
from tests.localapi.helpers import AUTH_KEY, SIGN_SECRET

MG = MicrogridId(11)
CLI = shutil.which("dispatch-cli") or str(pathlib.Path(sys.executable).parent / "dispatch-cli")


async def run_cli(port: int, *args: str) -> str:
    """Run dispatch-cli without blocking the loop the server runs on."""
    env = {
        **os.environ,
        "DISPATCH_API_URL": f"grpc://127.0.0.1:{port}?ssl=false",
        "DISPATCH_API_AUTH_KEY": AUTH_KEY,
        "DISPATCH_API_SIGN_SECRET": SIGN_SECRET,
    }
    process = await asyncio.create_subprocess_exec(
        CLI,
        "--raw",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


@pytest.mark.skipif(not pathlib.Path(CLI).exists(), reason="dispatch-cli not installed")
async def test_cli_create_list_update_delete(
    tmp_path: pathlib.Path, make_client: Callable[..., DispatchApiClient]
) -> None:
    api = LocalApiServer(
        listen="127.0.0.1:0",
        database=tmp_path / "cli.sqlite3",
        auth_keys=[AUTH_KEY],
        sign_secret=SIGN_SECRET,
    )
    port = await api.start()
    try:
        client = make_client(port, sign_secret=SIGN_SECRET)
        output = await run_cli(
            port, "create", str(int(MG)), "cli_type", "4,5", "in 1 hour", "in 10 minutes"
        )
        assert "Dispatch created." in output
        [created] = [d async for page in client.list(MG) for d in page]
        assert created.type == "cli_type"
        assert created.target == TargetIds(4, 5)
        assert created.duration is not None
        assert abs(created.duration - timedelta(minutes=10)) <= timedelta(seconds=2)

        listing = await run_cli(port, "list", str(int(MG)))
        assert "1 dispatches, 0 filtered out." in listing
        assert "cli_type" in listing

        await run_cli(
            port,
            "update",
            str(int(MG)),
            str(int(created.id)),
            "--duration",
            "in 20 minutes",
            "--active",
            "false",
        )
        updated = await client.get(microgrid_id=MG, dispatch_id=created.id)
        assert updated.duration is not None
        assert abs(updated.duration - timedelta(minutes=20)) <= timedelta(seconds=2)
        assert updated.active is False

        deleted = await run_cli(port, "delete", str(int(MG)), str(int(created.id)))
        assert f"Dispatches deleted: [{int(created.id)}]" in deleted
        assert [d async for page in client.list(MG) for d in page] == []
    finally:
        await api.stop(0)

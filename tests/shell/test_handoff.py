"""``run`` validates its settings, then becomes a daemon image that never loads pydantic."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aio_pika
import pytest

from dispatchd import handoff
from dispatchd.config import load_config
from tests.shell.test_logs import dispatchd_popen, read_until, stop


def test_settings_read_back_equal_what_was_loaded_secrets_included() -> None:
    settings = load_config(
        None,
        {
            "DISPATCHD_MICROGRID_IDS": "[7, 9]",
            "DISPATCHD_API__LOCAL__AUTH_KEYS": '["key-one", "key-two"]',
            "DISPATCHD_API__LOCAL__SIGN_SECRET": "hmac-secret",
            "DISPATCHD_AMQP__URL": "amqp://user:pass%2Fword@broker:5672/",
            "DISPATCHD_STATE__URL": "postgresql://u:pw@db/dispatchd",
        },
    )
    descriptor = handoff.settings_descriptor(settings)
    read = handoff.read_settings(descriptor)
    assert read == settings
    assert read.secret_values() == settings.secret_values()
    assert str(read.amqp.url) == "amqp://user:***@broker:5672/"
    with pytest.raises(OSError):
        os.fstat(descriptor)  # closed once read


def test_a_descriptor_holding_something_else_is_refused() -> None:
    descriptor = os.memfd_create("test-not-settings", 0)
    os.write(descriptor, pickle.dumps({"microgrid_ids": [1]}))
    os.lseek(descriptor, 0, os.SEEK_SET)
    with pytest.raises(TypeError, match="no dispatchd settings"):
        handoff.read_settings(descriptor)


def test_the_daemon_image_started_by_hand_says_how_it_is_started(
    clean_env: dict[str, str],
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dispatchd.handoff"],
        env=clean_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "usage: python -m dispatchd.handoff --settings-fd N (started by 'dispatchd run')"
    )


def test_a_descriptor_that_is_not_open_is_one_line(clean_env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dispatchd.handoff", "--settings-fd", "99"],
        env=clean_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["dispatchd run: OSError: [Errno 9] Bad file descriptor"]


def test_run_keeps_its_pid_and_settings_and_sheds_pydantic(
    tmp_path: Path,
    clean_env: dict[str, str],
    amqp_url: str,
    unique_name: Callable[[str], str],
) -> None:
    exchange = unique_name("handoff")
    env = {
        **clean_env,
        "DISPATCHD_API__LOCAL__LISTEN": "127.0.0.1:0",
        "DISPATCHD_HTTP__LISTEN": "127.0.0.1:0",
        "DISPATCHD_STATE__DIR": str(tmp_path),
        "DISPATCHD_AMQP__URL": amqp_url,
        "DISPATCHD_AMQP__EXCHANGE": exchange,
        "DISPATCHD_MICROGRID_IDS": "[41, 42]",
    }
    process = dispatchd_popen("run", env=env)
    try:
        lines = read_until(process, lambda line: "http listening" in line)
        for _ in range(2):  # one per microgrid
            lines += read_until(process, lambda line: "first sync done" in line)
        synced = {json.loads(line)["microgrid_id"] for line in lines if "first sync" in line}
        assert synced == {41, 42}
        pid = process.pid
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"dispatchd.handoff" in command
        mapped = Path(f"/proc/{pid}/maps").read_text()
        assert "pydantic" not in mapped
        assert "cygrpc" in mapped  # the check would see a library that is loaded
        address = next(json.loads(line)["address"] for line in lines if "http listening" in line)
        with urllib.request.urlopen(f"http://{address}/readyz", timeout=10) as response:
            assert json.loads(response.read())["ready"] is True
        asyncio.run(declared(amqp_url, exchange))
    finally:
        _, err = stop(process)
    assert process.returncode == 0, err
    assert '"event": "stopped"' in err


async def declared(amqp_url: str, exchange: str) -> None:
    """Fails unless ``exchange`` exists (a passive declare)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.get_exchange(exchange, ensure=True)

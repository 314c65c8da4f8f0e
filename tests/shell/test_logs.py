"""Logging: format choice, level, the standard library's loggers, secret masking."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatchd.config import load_config
from dispatchd.logs import (
    SecretMasker,
    configure_from_settings,
    configure_logging,
    get_logger,
    quiet_grpc_core,
    reset_logging,
)


class TtyBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    reset_logging()


def json_lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_json_format_writes_one_json_object_per_event() -> None:
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)
    log = get_logger("dispatchd.test", microgrid_id=7)
    log.info("first", dispatch_id=3)
    log.warning("second\nwith a newline")
    lines = json_lines(out)
    assert [line["event"] for line in lines] == ["first", "second\nwith a newline"]
    assert lines[0]["microgrid_id"] == 7 and lines[0]["dispatch_id"] == 3
    assert lines[0]["level"] == "info" and lines[1]["level"] == "warning"
    assert lines[0]["logger"] == "dispatchd.test"
    assert lines[0]["timestamp"].endswith("Z")


def test_console_format_is_key_value_text() -> None:
    out = io.StringIO()
    configure_logging("INFO", "console", stream=out)
    get_logger("dispatchd.test").info("hello", dispatch_id=3)
    text = out.getvalue()
    assert "hello" in text and "dispatch_id=3" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_auto_format_is_json_off_a_terminal_and_console_on_one() -> None:
    piped = io.StringIO()
    configure_logging("INFO", "auto", stream=piped)
    get_logger().info("piped")
    assert json_lines(piped)[0]["event"] == "piped"

    tty = TtyBuffer()
    configure_logging("INFO", "auto", stream=tty)
    get_logger().info("on a tty")
    assert "on a tty" in tty.getvalue()
    assert not tty.getvalue().lstrip().startswith("{")


def test_format_forced_to_json_even_on_a_terminal() -> None:
    tty = TtyBuffer()
    configure_logging("INFO", "json", stream=tty)
    get_logger().info("forced")
    assert json_lines(tty)[0]["event"] == "forced"


def test_level_is_honoured_for_structlog_and_stdlib() -> None:
    out = io.StringIO()
    configure_logging("WARNING", "json", stream=out)
    log = get_logger("dispatchd.test")
    log.debug("hidden debug")
    log.info("hidden info")
    log.warning("shown warning")
    logging.getLogger("aiormq").info("hidden stdlib info")
    logging.getLogger("aiormq").error("shown stdlib error")
    assert [line["event"] for line in json_lines(out)] == ["shown warning", "shown stdlib error"]


def test_debug_level_shows_debug() -> None:
    out = io.StringIO()
    configure_logging(logging.DEBUG, "json", stream=out)
    get_logger().debug("visible")
    assert json_lines(out)[0]["level"] == "debug"


@pytest.mark.parametrize("name", ["aio_pika", "aiormq", "grpc", "asyncio"])
def test_stdlib_loggers_go_through_the_same_renderer(name: str) -> None:
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)
    logging.getLogger(name).warning("from %s via %s", name, "stdlib")
    (line,) = json_lines(out)
    assert line["event"] == f"from {name} via stdlib"
    assert line["logger"] == name and line["level"] == "warning"


def test_reconfiguring_replaces_the_handler_instead_of_adding_one() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("INFO", "json", stream=first)
    configure_logging("INFO", "json", stream=second)
    get_logger().info("once")
    assert first.getvalue() == ""
    assert len(json_lines(second)) == 1


def test_secrets_are_masked_by_key_by_url_and_by_value() -> None:
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out, secrets=["the-auth-key-123"])
    log = get_logger("dispatchd.test")
    log.info(
        "connecting to amqp://guest:hunter2@broker:5672/ with the-auth-key-123",
        auth_key="raw-key",
        sign_secret="raw-secret",
        password="raw-password",
        nested={"token": "raw-token", "url": "amqps://u:pw-in-dict@h/"},
        urls=["amqp://a:pw-in-list@h/"],
        routing_key="dispatch.lifecycle.7.created",
    )
    logging.getLogger("aio_pika").warning(
        "reconnect amqp://guest:hunter2@broker/ key=%s", "the-auth-key-123"
    )
    try:
        raise ConnectionError("refused for amqp://guest:hunter2@broker/ the-auth-key-123")
    except ConnectionError:
        log.exception("broker unreachable")
    text = out.getvalue()
    for secret in (
        "hunter2",
        "the-auth-key-123",
        "raw-key",
        "raw-secret",
        "raw-password",
        "raw-token",
        "pw-in-dict",
        "pw-in-list",
    ):
        assert secret not in text, secret
    first, stdlib_line, failure = json_lines(out)
    assert first["event"] == "connecting to amqp://guest:***@broker:5672/ with ***"
    assert first["auth_key"] == "***" and first["password"] == "***"
    assert first["nested"] == {"token": "***", "url": "amqps://u:***@h/"}
    assert first["routing_key"] == "dispatch.lifecycle.7.created"  # not a secret
    assert stdlib_line["event"] == "reconnect amqp://guest:***@broker/ key=***"
    assert "ConnectionError" in failure["exception"]


def test_console_renderer_masks_tracebacks_too() -> None:
    out = io.StringIO()
    configure_logging("INFO", "console", stream=out, secrets=["console-secret"])
    try:
        raise ValueError("console-secret in amqp://u:pw-console@h/")
    except ValueError:
        get_logger().exception("failed")
    text = out.getvalue()
    assert "ValueError" in text
    assert "console-secret" not in text and "pw-console" not in text


def test_settings_secrets_are_masked_in_free_text() -> None:
    config = load_config(
        None,
        {
            "DISPATCHD_API__URL": "grpc://api:1",
            "DISPATCHD_API__AUTH_KEY": "configured-key-9",
            "DISPATCHD_AMQP__URL": "amqp://u:configured-pw-9@h/",
            "DISPATCHD_LOG__FORMAT": "json",
            "DISPATCHD_LOG__LEVEL": "DEBUG",
        },
    )
    out = io.StringIO()
    configure_from_settings(config, stream=out)
    get_logger().debug("metadata", header="configured-key-9", settings=config)
    logging.getLogger("aiormq").debug("password configured-pw-9 sent")
    text = out.getvalue()
    assert "configured-key-9" not in text and "configured-pw-9" not in text
    assert [line["level"] for line in json_lines(out)] == ["debug", "debug"]


@settings(max_examples=150, deadline=None)
@given(
    secrets=st.lists(
        st.text(alphabet="abcdefgh0123", min_size=4, max_size=12), min_size=1, max_size=4
    ),
    filler=st.lists(st.text(alphabet="abcdefgh0123 :/@", max_size=10), min_size=1, max_size=6),
)
def test_no_configured_secret_survives_in_any_field(secrets: list[str], filler: list[str]) -> None:
    masker = SecretMasker(secrets)
    text = "".join(part + secrets[i % len(secrets)] for i, part in enumerate(filler))
    event = {"event": text, "detail": [text, {"nested": text}], "count": 3}
    masked = json.dumps(masker(None, "info", event))
    for secret in secrets:
        assert secret not in masked
    assert json.loads(masked)["count"] == 3


@pytest.mark.parametrize("char", ["/", "#", "?"])
def test_passwords_that_break_the_url_parse_are_masked_in_log_lines(char: str) -> None:
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)
    url = f"amqp://user:Pw9xQz7Lm{char}x@broker:5672/"
    get_logger("dispatchd.test").warning(f"cannot connect to {url}", url=url, detail=[url])
    logging.getLogger("aiormq.connection").error("Connection to %s failed", url)
    text = out.getvalue()
    assert "Pw9xQz7Lm" not in text
    lines = json_lines(out)
    assert lines[0]["url"] == "amqp://user:***@broker:5672/"
    assert lines[1]["event"] == "Connection to amqp://user:***@broker:5672/ failed"


def test_quiet_grpc_core_keeps_what_the_operator_set() -> None:
    environ: dict[str, str] = {}
    quiet_grpc_core(environ)
    assert environ == {"GRPC_VERBOSITY": "NONE"}
    chosen = {"GRPC_VERBOSITY": "debug"}
    quiet_grpc_core(chosen)
    assert chosen == {"GRPC_VERBOSITY": "debug"}


# ------------------------------------------- gRPC core's own lines stay out of the stream


def dispatchd_popen(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dispatchd", *args],
        env={**env, "DISPATCHD_LOG__FORMAT": "json"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_until(process: subprocess.Popen[str], wanted: Callable[[str], bool]) -> list[str]:
    """stderr lines up to the first one ``wanted`` accepts.

    Fails if the process ends first; it is killed if that takes over a minute.
    """
    assert process.stderr is not None
    seen: list[str] = []
    deadline = threading.Timer(60, process.kill)
    deadline.start()
    try:
        while not seen or not wanted(seen[-1]):
            line = process.stderr.readline()
            assert line, f"exited (or was killed after 60 s) before the expected line: {seen}"
            seen.append(line.rstrip("\n"))
    finally:
        deadline.cancel()
    return seen


def stop(process: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGTERM, then the rest of stdout and stderr."""
    process.send_signal(signal.SIGTERM)
    try:
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return out, err


def assert_json_lines(lines: list[str]) -> None:
    for line in lines:
        assert isinstance(json.loads(line), dict), line


def test_a_taken_port_for_the_embedded_api_gives_json_lines_and_one_error_line(
    tmp_path: Path, clean_env: dict[str, str], amqp_url: str, unique_name: Callable[[str], str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {
            **clean_env,
            "DISPATCHD_API__LOCAL__LISTEN": f"127.0.0.1:{taken.getsockname()[1]}",
            "DISPATCHD_HTTP__LISTEN": "127.0.0.1:0",
            "DISPATCHD_STATE__DIR": str(tmp_path),
            "DISPATCHD_AMQP__URL": amqp_url,
            "DISPATCHD_AMQP__EXCHANGE": unique_name("grpc-quiet"),
        }
        process = dispatchd_popen("run", env=env)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    lines = (out + err).splitlines()
    # Before: "E1130 … add_port.cc:83] Failed to add port to server: …" from gRPC's core.
    assert not any("add_port" in line for line in lines), lines
    assert lines[-1].startswith("dispatchd run: ") and "Address already in use" in lines[-1]
    assert_json_lines(lines[:-1])


def test_tls_against_a_plaintext_api_gives_only_json_lines(
    tmp_path: Path, clean_env: dict[str, str], amqp_url: str, unique_name: Callable[[str], str]
) -> None:
    api = dispatchd_popen(
        "api",
        env={
            **clean_env,
            "DISPATCHD_API__LOCAL__LISTEN": "127.0.0.1:0",
            "DISPATCHD_STATE__DIR": str(tmp_path / "api"),
        },
    )
    try:
        listening = read_until(api, lambda line: "listening" in line)
        port = json.loads(listening[-1])["port"]
        daemon = dispatchd_popen(
            "run",
            env={
                **clean_env,
                # TLS (the client's default for grpc://) against the plaintext local API
                "DISPATCHD_API__URL": f"grpc://127.0.0.1:{port}",
                "DISPATCHD_API__AUTH_KEY": "any",
                "DISPATCHD_HTTP__LISTEN": "127.0.0.1:0",
                "DISPATCHD_STATE__DIR": str(tmp_path / "daemon"),
                "DISPATCHD_AMQP__URL": amqp_url,
                "DISPATCHD_AMQP__EXCHANGE": unique_name("grpc-quiet"),
            },
        )
        try:
            # Before: "I1130 … ssl_transport_security.cc:2563] Handshake failed …" lines.
            seen = read_until(daemon, lambda line: re.search("ssl|tls", line, re.I) is not None)
        finally:
            out, err = stop(daemon)
        assert_json_lines([*seen, *err.splitlines()])
        assert out == ""
    finally:
        _, api_err = stop(api)
    assert_json_lines([*listening, *api_err.splitlines()])


@pytest.mark.parametrize("encoded", ["Pw9xQz7Lm%2Fx", "Pw9xQz7Lm%23x", "Pw9xQz7Lm%3Fx"])
def test_run_never_logs_the_amqp_password(
    encoded: str, tmp_path: Path, clean_env: dict[str, str]
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # closed again: nothing listens there
    daemon = dispatchd_popen(
        "run",
        env={
            **clean_env,
            "DISPATCHD_AMQP__URL": f"amqp://user:{encoded}@127.0.0.1:{port}/",
            "DISPATCHD_API__LOCAL__LISTEN": "127.0.0.1:0",
            "DISPATCHD_HTTP__LISTEN": "127.0.0.1:0",
            "DISPATCHD_STATE__DIR": str(tmp_path),
            "DISPATCHD_LOG__LEVEL": "DEBUG",
        },
    )
    try:
        # the broker's URL, as the AMQP client logs its reconnects
        seen = read_until(daemon, lambda line: f"127.0.0.1:{port}/" in line)
    finally:
        out, err = stop(daemon)
    lines = [*seen, *err.splitlines(), *out.splitlines()]
    assert not any("Pw9xQz7Lm" in line for line in lines), [
        line for line in lines if "Pw9xQz7Lm" in line
    ]
    assert any(f"user:***@127.0.0.1:{port}/" in line for line in lines)
    assert_json_lines(lines)


async def test_what_grpc_python_logs_comes_out_as_json_lines() -> None:
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)

    def broken(request: bytes, context: grpc.ServicerContext) -> bytes:
        raise RuntimeError("servicer bug")

    handler = grpc.method_handlers_generic_handler(
        "test.Broken", {"Call": grpc.unary_unary_rpc_method_handler(broken)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await channel.unary_unary("/test.Broken/Call")(b"", timeout=10)
    finally:
        await server.stop(None)
    lines = json_lines(out)
    reported = [line for line in lines if line["logger"].startswith("grpc")]
    assert reported, lines
    assert "servicer bug" in json.dumps(reported)

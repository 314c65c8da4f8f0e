"""The command line, in-process through ``main`` and as ``python -m dispatchd``."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import aiormq.exceptions
import pytest

import dispatchd
from dispatchd import cli
from dispatchd.config import effective_config, load_config
from dispatchd.logs import reset_logging
from dispatchd.settings import Settings

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config.example.toml"
COMMANDS = ["run", "check-config", "api", "schedule", "tail"]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Commands configure logging on the captured stderr; undo it after each test."""
    yield
    reset_logging()


def dispatchd_process(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dispatchd", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_version_in_process_and_as_a_module(
    capsys: pytest.CaptureFixture[str], clean_env: dict[str, str]
) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dispatchd {dispatchd.__version__}"
    done = dispatchd_process("--version", env=clean_env)
    assert (done.returncode, done.stdout.strip()) == (0, f"dispatchd {dispatchd.__version__}")


def test_the_version_is_the_installed_distribution_version() -> None:
    from importlib.metadata import version

    assert dispatchd.__version__ == version("dispatchd")


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_of_every_command_explains_it(
    command: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--help"] if command is None else [command, "--help"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: dispatchd")
    if command is None:
        assert all(name in text for name in COMMANDS)
    else:
        assert "--config FILE" in text
        assert len(text.split("\n\n")[1].split()) >= 8  # a real description paragraph


def test_no_command_unknown_command_and_unknown_flag_exit_2_naming_them(
    capsys: pytest.CaptureFixture[str], clean_env: dict[str, str]
) -> None:
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().err
    assert cli.main(["frobnicate"]) == 2
    assert "frobnicate" in capsys.readouterr().err
    assert cli.main(["check-config", "--frobnicate"]) == 2
    assert "--frobnicate" in capsys.readouterr().err
    done = dispatchd_process("tail", "--no-such-flag", env=clean_env)
    assert done.returncode == 2 and "--no-such-flag" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["schedule"], "--microgrid"),
        (["schedule", "--microgrid", "seven"], "--microgrid"),
        (["schedule", "--microgrid", "0"], "--microgrid"),
        (["schedule", "--microgrid", "7", "--from", "yesterday"], "--from"),
        (["schedule", "--microgrid", "7", "--to", "2026-13-01"], "--to"),
        (["schedule", "--microgrid", "7", "--limit", "0"], "--limit"),
        (
            ["schedule", "--microgrid", "7", "--from", "2026-05-02", "--to", "2026-05-01"],
            "--to",
        ),
    ],
)
def test_bad_schedule_arguments_exit_2_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str], clean_env: dict[str, str]
) -> None:
    assert cli.main(argv) == 2
    assert flag in capsys.readouterr().err


def test_check_config_of_the_example_exits_0_in_process_and_as_a_module(
    capsys: pytest.CaptureFixture[str], clean_env: dict[str, str]
) -> None:
    assert cli.main(["check-config", "--config", str(EXAMPLE)]) == 0
    in_process = capsys.readouterr().out
    done = dispatchd_process("check-config", "--config", str(EXAMPLE), env=clean_env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == in_process
    assert tomllib.loads(done.stdout)["microgrid_ids"] == [7]


def test_check_config_output_loads_back_to_the_same_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: dict[str, str]
) -> None:
    source = tmp_path / "in.toml"
    source.write_text(
        'microgrid_ids = [3, 9]\nshutdown_timeout = 2.5\n[api]\nurl = "grpc://h:50051"\n'
        'auth_key = "k"\n'
        '[amqp]\nexchange = "x"\n[log]\nlevel = "error"\nformat = "console"\n'
    )
    assert cli.main(["check-config", "--config", str(source)]) == 0
    printed = tmp_path / "printed.toml"
    printed.write_text(capsys.readouterr().out)
    assert effective_config(load_config(printed, {})) == effective_config(load_config(source, {}))


def test_check_config_json(capsys: pytest.CaptureFixture[str], clean_env: dict[str, str]) -> None:
    assert cli.main(["check-config", "--json", "--config", str(EXAMPLE)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["amqp"]["url"] == "amqp://guest:***@localhost:5672/"
    assert data["microgrid_ids"] == [7]


def test_check_config_masks_every_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: dict[str, str]
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("secret-from-file-1\n")
    env = {
        **clean_env,
        "DISPATCHD_API__URL": "grpc://api:1",
        "DISPATCHD_API__AUTH_KEY_FILE": str(key_file),
        "DISPATCHD_API__SIGN_SECRET": "secret-sign-2",
        "DISPATCHD_API__LOCAL__AUTH_KEYS": '["secret-local-3"]',
        "DISPATCHD_API__LOCAL__SIGN_SECRET": "secret-local-sign-4",
        "DISPATCHD_AMQP__URL": "amqp://user:secret-password-5@broker/",
    }
    for extra in ([], ["--json"]):
        done = dispatchd_process("check-config", *extra, env=env)
        assert done.returncode == 0, done.stderr
        for secret in ("secret-from-file-1", "secret-sign-2", "secret-local-3", "secret-local-4"):
            assert secret not in done.stdout
        assert "secret-password-5" not in done.stdout
        assert "amqp://user:***@broker/" in done.stdout
        assert done.stdout.count("***") == 5


def test_check_config_reports_every_problem_and_exits_2(
    tmp_path: Path, clean_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('microgrid_ids = [7]\nbogus = 1\n[api.local]\nlisten = "nowhere"\n')
    env = {
        **clean_env,
        "DISPATCHD_API__AUTH_KEY_FILE": str(tmp_path / "missing-key"),
        "DISPATCHD_LOG__LEVEL": "chatty",
    }
    done = dispatchd_process("check-config", "--config", str(bad), env=env)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    keys = {line.split(":", 1)[0] for line in done.stderr.splitlines()}
    assert keys == {"bogus", "api.local.listen", "api.auth_key_file", "log.level"}
    assert done.stdout == ""

    assert cli.main(["check-config", "--config", str(bad)]) == 2
    assert "bogus: unknown key" in capsys.readouterr().err.splitlines()


def test_missing_config_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: dict[str, str]
) -> None:
    assert cli.main(["run", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "absent.toml" in capsys.readouterr().err


def test_dispatchd_config_environment_names_the_file(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("microgrid_ids = [11]\n")
    done = dispatchd_process("check-config", env={**clean_env, "DISPATCHD_CONFIG": str(path)})
    assert done.returncode == 0 and "microgrid_ids = [11]" in done.stdout


def test_check_config_loads_no_command_module(tmp_path: Path, clean_env: dict[str, str]) -> None:
    """Each command imports its module when it runs: check-config stays quick."""
    script = (
        "import sys\n"
        "from dispatchd import cli\n"
        "code = cli.main(['check-config'])\n"
        "heavy = ('dispatchd.daemon', 'dispatchd.tail', 'dispatchd.schedule', 'grpc', 'aio_pika')\n"
        "print(code, [name for name in heavy if name in sys.modules])\n"
    )
    env = {**clean_env, "DISPATCHD_STATE__DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.splitlines()[-1] == "0 []", done.stderr


def replace_commands(
    monkeypatch: pytest.MonkeyPatch, make: Callable[[str], Callable[..., int]]
) -> None:
    """Put ``make(module)`` in place of the ``main`` of each command's module."""
    for module in ("dispatchd.handoff", "dispatchd.schedule", "dispatchd.tail"):
        monkeypatch.setattr(f"{module}.main", make(module))


def fake_command(calls: list[tuple[Any, ...]], result: int = 0) -> Callable[..., int]:
    def command(*args: Any, **kwargs: Any) -> int:
        calls.append((args, kwargs))
        return result

    return command


def test_commands_are_handed_the_settings_and_parsed_arguments(
    monkeypatch: pytest.MonkeyPatch, clean_env: dict[str, str]
) -> None:
    calls: list[tuple[Any, ...]] = []
    modules: list[str] = []

    def recording(module: str) -> Callable[..., int]:
        def command(*args: Any, **kwargs: Any) -> int:
            modules.append(module)
            return fake_command(calls, result=len(modules) - 1)(*args, **kwargs)

        return command

    replace_commands(monkeypatch, recording)
    assert cli.main(["run"]) == 0
    assert cli.main(["tail", "--bind", "dispatch.running.#", "--bind", "x.y", "--json"]) == 1
    assert cli.main(["tail"]) == 2
    assert (
        cli.main(
            [
                "schedule",
                "--microgrid",
                "7",
                "--from",
                "2026-05-01T12:00:00+02:00",
                "--to",
                "2026-05-02T00:00",
                "--type",
                "EV_CHARGING",
                "--limit",
                "50",
            ]
        )
        == 3
    )
    assert modules == [
        "dispatchd.handoff",
        "dispatchd.tail",
        "dispatchd.tail",
        "dispatchd.schedule",
    ]
    (run_args, run_kwargs), (_, tail_kwargs), (_, default_tail), (_, sched) = calls
    assert isinstance(run_args[0], Settings) and run_kwargs == {}
    assert tail_kwargs == {"bindings": ["dispatch.running.#", "x.y"], "raw_json": True}
    assert default_tail == {"bindings": ["#"], "raw_json": False}
    assert sched == {
        "microgrid_id": 7,
        "start": datetime(2026, 5, 1, 10, tzinfo=UTC),
        "end": datetime(2026, 5, 2, tzinfo=UTC),
        "dispatch_type": "EV_CHARGING",
        "limit": 50,
    }


def test_schedule_window_defaults_to_the_next_day(
    monkeypatch: pytest.MonkeyPatch, clean_env: dict[str, str]
) -> None:
    calls: list[tuple[Any, ...]] = []
    replace_commands(monkeypatch, lambda module: fake_command(calls))
    before = datetime.now(UTC)
    assert cli.main(["schedule", "--microgrid", "7"]) == 0
    after = datetime.now(UTC)
    kwargs = calls[0][1]
    assert before <= kwargs["start"] <= after
    assert kwargs["end"] - kwargs["start"] == timedelta(days=1)
    assert kwargs["dispatch_type"] is None
    assert kwargs["limit"] == cli.SCHEDULE_LIMIT


def test_an_unexpected_failure_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], clean_env: dict[str, str]
) -> None:
    def broken(*args: Any, **kwargs: Any) -> int:
        raise ConnectionRefusedError("broker at localhost:5672 refused the connection")

    replace_commands(monkeypatch, lambda module: broken)
    assert cli.main(["tail"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "dispatchd tail: ConnectionRefusedError: broker at localhost:5672 refused the connection\n"
    )


def test_render_toml_rejects_what_it_cannot_write() -> None:
    assert tomllib.loads(cli.render_toml({"a": [1, "b"], "t": {"x": True, "u": {"y": 1.5}}})) == {
        "a": [1, "b"],
        "t": {"x": True, "u": {"y": 1.5}},
    }
    with pytest.raises(TypeError):
        cli.render_toml({"a": object()})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_api_command_serves_until_sigterm(tmp_path: Path, clean_env: dict[str, str]) -> None:
    port = free_port()
    env = {
        **clean_env,
        "DISPATCHD_API__LOCAL__LISTEN": f"127.0.0.1:{port}",
        "DISPATCHD_STATE__DIR": str(tmp_path / "state"),
        "DISPATCHD_LOG__FORMAT": "json",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "dispatchd", "api"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        # Blocks until the server logs that it listens (or exits: then "" fails the test).
        seen: list[str] = []
        while not any("listening" in line for line in seen):
            line = process.stderr.readline()
            assert line, f"dispatchd api exited early: {seen}"
            seen.append(line)
        assert re.search(rf"\b{port}\b", seen[-1]), seen[-1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        assert (tmp_path / "state" / "dispatches.sqlite3").exists()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        lines = [*seen, *process.stderr.read().splitlines()]
        assert not any("Traceback" in line for line in lines)
        events = [json.loads(line)["event"] for line in lines if line.startswith("{")]
        assert "stopping local dispatch API" in events
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_api_command_with_a_taken_port_fails_with_one_line(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **clean_env,
            "DISPATCHD_API__LOCAL__LISTEN": f"127.0.0.1:{port}",
            "DISPATCHD_STATE__DIR": str(tmp_path),
        }
        done = dispatchd_process("api", env=env)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    # gRPC's C core is quiet: no "E… add_port.cc" line, only ours, with the OS's reason.
    assert done.stderr == (
        f"dispatchd api: OSError: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )


def test_check_config_and_run_refuse_what_would_fail_at_start_with_the_same_lines(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    state_file = tmp_path / "state"
    state_file.write_text("")
    env = {
        **clean_env,
        "DISPATCHD_AMQP__EXCHANGE": "amq.topic",
        "DISPATCHD_HTTP__LISTEN": "127.0.0.1:50051",  # the embedded API's default address
        "DISPATCHD_STATE__DIR": str(state_file),
    }
    checked = dispatchd_process("check-config", env=env)
    assert checked.returncode == 2 and checked.stdout == ""
    keys = [line.split(":", 1)[0] for line in checked.stderr.splitlines()]
    assert keys == ["amqp.exchange", "http.listen", "state.dir"]
    as_json = dispatchd_process("check-config", "--json", env=env)
    assert (as_json.returncode, as_json.stdout, as_json.stderr) == (2, "", checked.stderr)
    ran = dispatchd_process("run", env=env)
    assert (ran.returncode, ran.stderr) == (2, checked.stderr)

    remote = {
        **clean_env,
        "DISPATCHD_API__URL": "grpc://api:443",
        "DISPATCHD_STATE__DIR": str(tmp_path),
    }
    ran = dispatchd_process("run", env=remote)
    assert ran.returncode == 2
    assert ran.stderr.startswith("api.auth_key: required when api.url is set")
    assert len(ran.stderr.splitlines()) == 1


AMBIGUOUS_URLS = [
    pytest.param(f"amqp://user:{password}@127.0.0.1:5672/", id=password)
    for password in ("5672/Pw9xQz7Lm", "5672#Pw9xQz7Lm", "5672?Pw9xQz7Lm", "Pw9xQz7Lm/x")
]


@pytest.mark.parametrize("url", AMBIGUOUS_URLS)
@pytest.mark.parametrize(
    "command", [["check-config"], ["check-config", "--json"], ["run"], ["tail"]]
)
def test_a_password_that_breaks_the_url_is_refused_and_never_shown(
    url: str, command: list[str], tmp_path: Path, clean_env: dict[str, str]
) -> None:
    env = {**clean_env, "DISPATCHD_AMQP__URL": url, "DISPATCHD_STATE__DIR": str(tmp_path)}
    done = dispatchd_process(*command, env=env)
    assert done.returncode == 2, done.stderr
    assert "Pw9xQz7Lm" not in done.stdout + done.stderr
    assert done.stderr.startswith("amqp.url: ") and "percent-encode" in done.stderr
    assert "amqp://user:***@127.0.0.1:5672/" in done.stderr


@pytest.mark.parametrize("encoded", ["Pw9xQz7Lm%2Fx", "Pw9xQz7Lm%23x", "Pw9xQz7Lm%3Fx"])
def test_tail_names_an_unreachable_broker_without_its_password(
    encoded: str, clean_env: dict[str, str]
) -> None:
    port = free_port()  # nothing listens there
    env = {**clean_env, "DISPATCHD_AMQP__URL": f"amqp://user:{encoded}@127.0.0.1:{port}/"}
    done = dispatchd_process("tail", env=env)
    assert done.returncode == 1
    assert "Pw9xQz7Lm" not in done.stdout + done.stderr
    assert f"amqp://user:***@127.0.0.1:{port}/" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unexpected_failure_line_masks_configured_secrets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], clean_env: dict[str, str]
) -> None:
    monkeypatch.setenv("DISPATCHD_AMQP__URL", "amqp://user:Pw9xQz7Lm%2Fx@broker/")

    def broken(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("login Pw9xQz7Lm/x refused at amqp://user:Pw9xQz7Lm/x@broker/")

    replace_commands(monkeypatch, lambda module: broken)
    assert cli.main(["tail"]) == 1
    err = capsys.readouterr().err
    assert "Pw9xQz7Lm" not in err
    assert err == "dispatchd tail: RuntimeError: login *** refused at amqp://user:***@broker/\n"


def test_tail_on_a_missing_exchange_says_so_and_does_not_create_it(
    amqp_url: str, unique_name: Callable[[str], str], clean_env: dict[str, str]
) -> None:
    exchange = unique_name("absent")
    env = {**clean_env, "DISPATCHD_AMQP__URL": amqp_url, "DISPATCHD_AMQP__EXCHANGE": exchange}
    done = dispatchd_process("tail", env=env)  # before: created it, then waited forever
    assert done.returncode == 1
    assert done.stderr.startswith(f"dispatchd tail: exchange '{exchange}' does not exist")
    assert "dispatchd run declares it" in done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert not exchange_exists(amqp_url, exchange)


def exchange_exists(amqp_url: str, name: str) -> bool:
    async def check() -> bool:
        async with await aio_pika.connect(amqp_url) as connection:
            channel = await connection.channel()
            try:
                await channel.get_exchange(name, ensure=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return False
            return True

    return asyncio.run(check())


def test_the_readme_dispatch_cli_duration_means_exactly_what_it_says() -> None:
    from frequenz.client.dispatch._cli_types import FuzzyTimeDelta

    readme = (REPO / "README.md").read_text()
    create = next(line for line in readme.splitlines() if line.strip().startswith("create "))
    duration = shlex.split(create.partition("#")[0])[-1]
    # dispatch-cli's own parser; a number like 1800 would become "until 18:00".
    assert FuzzyTimeDelta().convert(duration, None, None) == timedelta(hours=1)
    assert "one hour" in create.partition("#")[2]

"""Configuration: sources and their precedence, validation, ``*_file`` secrets, masking."""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatchd.config import SECRET_KEYS, effective_config, load_config, local_problems
from dispatchd.settings import (
    ConfigError,
    Secret,
    Settings,
    default_replica_id,
    mask_url,
    redact_urls,
    split_host_port,
)

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "dispatchd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path | None, env: dict[str, str]) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, env)
    return dict(caught.value.problems)


def test_defaults_need_no_file_and_use_the_embedded_api() -> None:
    config = load_config(None, {})
    assert config.microgrid_ids == [1]
    assert config.shutdown_timeout == 10
    assert config.api.url is None and config.embedded_api
    assert config.api.call_timeout == 60 and config.api.stream_timeout == 300
    assert config.api.local.listen == "127.0.0.1:50051"
    assert config.state.dir == Path.cwd() / "var"
    assert config.api.local.database == Path.cwd() / "var" / "dispatches.sqlite3"
    assert config.amqp.url.get_secret_value() == "amqp://guest:guest@localhost:5672/"
    assert config.amqp.exchange == "dispatch"
    assert config.http.listen == "127.0.0.1:9464"
    assert (config.log.level, config.log.format) == ("INFO", "auto")


def test_file_values_override_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
microgrid_ids = [7, 8]
shutdown_timeout = 3.5
[api]
url = "grpc://dispatch.example.com:443"
auth_key = "k"
[amqp]
exchange = "other"
[log]
level = "debug"
format = "json"
""",
    )
    config = load_config(path, {})
    assert config.microgrid_ids == [7, 8]
    assert config.shutdown_timeout == 3.5
    assert config.api.url == "grpc://dispatch.example.com:443"
    assert not config.embedded_api
    assert config.api.auth_key is not None and config.api.auth_key.get_secret_value() == "k"
    assert config.amqp.exchange == "other"
    assert (config.log.level, config.log.format) == ("DEBUG", "json")
    assert config.http.listen == "127.0.0.1:9464"  # untouched default


def test_environment_overrides_file_which_overrides_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[amqp]\nurl = "amqp://file:pw@file-host:5672/"\nexchange = "from-file"\n'
        '[log]\nlevel = "WARNING"\n',
    )
    env = {
        "DISPATCHD_AMQP__URL": "amqp://env:pw@env-host:5672/",
        "DISPATCHD_MICROGRID_IDS": "[7,8]",
        "DISPATCHD_API__LOCAL__LISTEN": "0.0.0.0:50052",
    }
    config = load_config(path, env)
    assert config.amqp.url.get_secret_value() == "amqp://env:pw@env-host:5672/"  # env > file
    assert config.amqp.exchange == "from-file"  # file > default
    assert config.log.level == "WARNING"
    assert config.microgrid_ids == [7, 8]  # env > default
    assert config.api.local.listen == "0.0.0.0:50052"
    assert config.shutdown_timeout == 10  # default


def test_dispatchd_config_names_the_file_when_no_path_is_given(tmp_path: Path) -> None:
    path = write(tmp_path, "microgrid_ids = [42]\n")
    assert load_config(None, {"DISPATCHD_CONFIG": str(path)}).microgrid_ids == [42]
    other = write(tmp_path, "microgrid_ids = [43]\n", "other.toml")
    assert load_config(other, {"DISPATCHD_CONFIG": str(path)}).microgrid_ids == [43]


def test_a_bad_type_names_its_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'microgrid_ids = "seven"\n[api]\ncall_timeout = "soon"\n')
    problems = problems_of(path, {})
    assert set(problems) == {"microgrid_ids", "api.call_timeout"}


def test_unknown_keys_are_rejected_at_every_level_all_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'colour = "blue"\n[api.local]\nlisten = "127.0.0.1:1"\ndatabse = "x"\n'
        '[amqp]\nexchnage = "y"\n[metrics]\nport = 1\n',
    )
    problems = problems_of(path, {})
    assert problems == {
        "colour": "unknown key",
        "api.local.databse": "unknown key",
        "amqp.exchnage": "unknown key",
        "metrics": "unknown key",
    }


def test_toml_syntax_error_is_reported_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "microgrid_ids = [7]\n[amqp\nurl = 1\n")
    problems = problems_of(path, {})
    assert list(problems) == ["config"]
    assert "line 2" in problems["config"] and str(path) in problems["config"]


def test_missing_config_file_is_a_problem(tmp_path: Path) -> None:
    problems = problems_of(tmp_path / "absent.toml", {})
    assert "absent.toml" in problems["config"]


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("microgrid_ids = []", "microgrid_ids"),
        ("microgrid_ids = [0]", "microgrid_ids.0"),
        ("microgrid_ids = [-3]", "microgrid_ids.0"),
        ("microgrid_ids = [7, 7]", "microgrid_ids"),
        ("shutdown_timeout = 0", "shutdown_timeout"),
        ("[api]\ncall_timeout = -1", "api.call_timeout"),
        ("[api]\nstream_timeout = 0", "api.stream_timeout"),
        ('[api]\nurl = "http://example.com:443"', "api.url"),
        ('[api]\nurl = "grpc://:443"', "api.url"),
        ('[api]\nurl = "grpc://host:99999"', "api.url"),
        ('[api]\nurl = "grpc://host:1/path"', "api.url"),
        ('[api.local]\nlisten = "127.0.0.1"', "api.local.listen"),
        ('[api.local]\nlisten = "127.0.0.1:65536"', "api.local.listen"),
        ('[api.local]\nauth_keys = [""]', "api.local.auth_keys"),
        ('[http]\nlisten = ":9464"', "http.listen"),
        ('[http]\nlisten = "host:http"', "http.listen"),
        ('[amqp]\nurl = "http://guest:guest@localhost/"', "amqp.url"),
        ('[amqp]\nurl = "amqp:///vhost"', "amqp.url"),
        ('[amqp]\nexchange = ""', "amqp.exchange"),
        ('[log]\nlevel = "LOUD"', "log.level"),
        ('[log]\nformat = "xml"', "log.format"),
    ],
)
def test_invalid_values_name_their_key(tmp_path: Path, toml: str, key: str) -> None:
    assert key in problems_of(write(tmp_path, toml + "\n"), {})


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[api]\nurl = "grpc://h:1"', "grpc://h:1"),
        ('[api]\nurl = "grpc://h:1?ssl=false"', "grpc://h:1?ssl=false"),
        ('[api]\nurl = "grpcs://h:443"', "grpc://h:443?ssl=true"),
        (
            '[api]\nurl = "grpcs://h:443?ssl=false&keep_alive=on"',
            "grpc://h:443?ssl=true&keep_alive=on",
        ),
        ("", None),
    ],
)
def test_client_url_is_what_dispatch_api_client_understands(
    tmp_path: Path, toml: str, expected: str | None
) -> None:
    assert load_config(write(tmp_path, toml + "\n"), {}).api.client_url == expected


def test_listen_addresses_accept_ipv6_and_port_zero() -> None:
    assert split_host_port("[::1]:50051") == ("::1", 50051)
    assert split_host_port("0.0.0.0:0") == ("0.0.0.0", 0)
    config = load_config(None, {"DISPATCHD_HTTP__LISTEN": "[::]:0"})
    assert config.http.listen == "[::]:0"


def test_relative_database_is_under_state_dir_and_absolute_is_kept(tmp_path: Path) -> None:
    relative = load_config(write(tmp_path, '[state]\ndir = "/srv/state"\n'), {})
    assert relative.api.local.database == Path("/srv/state/dispatches.sqlite3")
    absolute = load_config(
        write(tmp_path, '[state]\ndir = "/srv/state"\n[api.local]\ndatabase = "/db/x.sqlite3"\n'),
        {},
    )
    assert absolute.api.local.database == Path("/db/x.sqlite3")
    assert absolute.state.dir == Path("/srv/state")
    cwd_relative = load_config(None, {"DISPATCHD_STATE__DIR": "run/state"})
    assert cwd_relative.api.local.database == Path.cwd() / "run/state/dispatches.sqlite3"


def test_environment_lists_are_json_and_bad_json_names_the_variable() -> None:
    env = {"DISPATCHD_API__LOCAL__AUTH_KEYS": '["k1", "k2"]'}
    keys = load_config(None, env).api.local.auth_keys
    assert [key.get_secret_value() for key in keys] == ["k1", "k2"]
    problems = problems_of(None, {"DISPATCHD_MICROGRID_IDS": "7,8"})
    assert list(problems) == ["DISPATCHD_MICROGRID_IDS"]


def test_unknown_environment_variables_are_rejected_with_a_hint() -> None:
    problems = problems_of(
        None,
        {
            "DISPATCHD_AMQP_URL": "amqp://h/",
            "DISPATCHD_API__LOCAL__PORT": "1",
            "DISPATCHD_LOG__LEVEL__X": "1",
            "UNRELATED": "fine",
        },
    )
    assert set(problems) == {
        "DISPATCHD_AMQP_URL",
        "DISPATCHD_API__LOCAL__PORT",
        "DISPATCHD_LOG__LEVEL__X",
    }
    assert "__" in problems["DISPATCHD_AMQP_URL"]


def test_environment_value_errors_name_the_dotted_key() -> None:
    problems = problems_of(None, {"DISPATCHD_SHUTDOWN_TIMEOUT": "never"})
    assert list(problems) == ["shutdown_timeout"]


def test_secret_files_are_read_with_the_trailing_newline_stripped(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("file-key\n")
    (tmp_path / "sign").write_text("file-sign\r\n")
    (tmp_path / "keys").write_text("alpha\n\n beta \n")
    (tmp_path / "url").write_text("amqp://u:file-pw@broker:5672/\n")
    path = write(
        tmp_path,
        f'[api]\nurl = "grpc://h:1"\nauth_key_file = "{tmp_path / "key"}"\n'
        f'[api.local]\nauth_keys_file = "{tmp_path / "keys"}"\n'
        f'[amqp]\nurl_file = "{tmp_path / "url"}"\n',
    )
    env = {"DISPATCHD_API__SIGN_SECRET_FILE": str(tmp_path / "sign")}
    config = load_config(path, env)
    assert config.api.auth_key is not None
    assert config.api.auth_key.get_secret_value() == "file-key"
    assert config.api.sign_secret is not None
    assert config.api.sign_secret.get_secret_value() == "file-sign"
    assert [k.get_secret_value() for k in config.api.local.auth_keys] == ["alpha", "beta"]
    assert config.amqp.url.get_secret_value() == "amqp://u:file-pw@broker:5672/"


def test_missing_secret_files_are_named_by_key_together_with_other_problems(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        f'[api]\nauth_key_file = "{tmp_path / "nope"}"\n'
        f'[api.local]\nsign_secret_file = "{tmp_path / "nope2"}"\n',
    )
    problems = problems_of(path, {"DISPATCHD_LOG__FORMAT": "xml"})
    assert "nope" in problems["api.auth_key_file"]
    assert "nope2" in problems["api.local.sign_secret_file"]
    assert "log.format" in problems


def test_a_secret_and_its_file_together_are_a_problem(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("k")
    path = write(tmp_path, f'[api]\nauth_key = "k"\nauth_key_file = "{tmp_path / "key"}"\n')
    assert "api.auth_key" in problems_of(path, {})


def test_a_secret_and_its_file_in_different_sources_are_a_problem(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("from-file")
    path = write(tmp_path, f'[api]\nauth_key_file = "{tmp_path / "key"}"\n')
    problems = problems_of(path, {"DISPATCHD_API__AUTH_KEY": "from-env"})
    assert problems == {"api.auth_key": "set either auth_key or auth_key_file, not both"}


def test_a_secret_file_in_the_environment_wins_over_one_in_the_file(tmp_path: Path) -> None:
    (tmp_path / "file-key").write_text("from-toml\n")
    (tmp_path / "env-key").write_text("from-env\n")
    path = write(tmp_path, f'[api]\nauth_key_file = "{tmp_path / "file-key"}"\n')
    config = load_config(path, {"DISPATCHD_API__AUTH_KEY_FILE": str(tmp_path / "env-key")})
    assert config.api.auth_key == Secret("from-env")


def test_embedded_api_lends_its_credentials_to_the_daemon() -> None:
    env = {
        "DISPATCHD_API__LOCAL__AUTH_KEYS": '["first", "second"]',
        "DISPATCHD_API__LOCAL__SIGN_SECRET": "hmac",
    }
    config = load_config(None, env)
    assert config.api.auth_key == Secret("first")
    assert config.api.sign_secret == Secret("hmac")
    chosen = load_config(None, {**env, "DISPATCHD_API__AUTH_KEY": "second"})
    assert chosen.api.auth_key == Secret("second")
    assert "api.auth_key" in problems_of(None, {**env, "DISPATCHD_API__AUTH_KEY": "other"})
    assert "api.sign_secret" in problems_of(None, {**env, "DISPATCHD_API__SIGN_SECRET": "x"})


def test_empty_sign_secret_means_unset() -> None:
    config = load_config(None, {"DISPATCHD_API__LOCAL__SIGN_SECRET": ""})
    assert config.api.local.sign_secret is None


def test_every_secret_key_is_a_secret_field() -> None:
    config = load_config(None, SECRETS)
    for key in SECRET_KEYS:
        value: object = config
        for part in key.split("."):
            value = getattr(value, part)
        sample = value[0] if isinstance(value, list) else value
        assert isinstance(sample, Secret), key


SECRETS = {
    "DISPATCHD_API__URL": "grpc://api.example.com:443",
    "DISPATCHD_API__AUTH_KEY": "auth-key-value-1",
    "DISPATCHD_API__SIGN_SECRET": "sign-secret-value-2",
    "DISPATCHD_API__LOCAL__AUTH_KEYS": '["local-key-value-3"]',
    "DISPATCHD_API__LOCAL__SIGN_SECRET": "local-sign-value-4",
    "DISPATCHD_AMQP__URL": "amqp://user:amqp-password-5@broker:5672/",
    "DISPATCHD_STATE__URL": "postgresql://user:state-password-6@db:5432/dispatchd",
}
SECRET_TEXTS = [
    "auth-key-value-1",
    "sign-secret-value-2",
    "local-key-value-3",
    "local-sign-value-4",
    "amqp-password-5",
    "state-password-6",
]


def test_secrets_are_masked_in_str_repr_and_effective_config() -> None:
    config = load_config(None, SECRETS)
    shown = [str(config), repr(config), str(effective_config(config))]
    for text in shown:
        for secret in SECRET_TEXTS:
            assert secret not in text
    effective = effective_config(config)
    assert effective["amqp"]["url"] == "amqp://user:***@broker:5672/"
    assert effective["api"]["auth_key"] == "***"
    assert effective["api"]["local"]["auth_keys"] == ["***"]
    assert sorted(config.secret_values()) == sorted(SECRET_TEXTS)


def test_effective_config_of_the_example_is_valid_toml_data() -> None:
    config = load_config(REPO / "config.example.toml", {})
    effective = effective_config(config)
    assert effective["microgrid_ids"] == [7]
    assert "url" not in effective["api"]  # unset: embedded API
    assert tomllib.loads(f'x = "{effective["amqp"]["url"]}"')


@settings(max_examples=200, deadline=None)
@given(
    user=st.text(alphabet="abcdefghij", min_size=0, max_size=8),
    password=st.text(alphabet="0123456789!$&'()+,;=~-._", min_size=1, max_size=20),
    host=st.text(alphabet="klmnopqrstuvwxyz", min_size=1, max_size=12),
)
def test_mask_url_never_shows_the_password(user: str, password: str, host: str) -> None:
    url = f"amqp://{user}:{password}@{host}:5672/vhost"
    masked = mask_url(url)
    assert password not in masked.replace("5672", "")
    assert masked == f"amqp://{user}:***@{host}:5672/vhost"


def test_mask_url_leaves_urls_without_password_alone() -> None:
    assert mask_url("amqp://broker:5672/") == "amqp://broker:5672/"
    assert mask_url("amqp://user@broker/") == "amqp://user@broker/"


def test_settings_are_frozen() -> None:
    config = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.shutdown_timeout = 1  # type: ignore[misc]


# ------------------------------------------------------- passwords that break the URL parse

AMBIGUOUS_PASSWORDS = [
    # Each character ends the host part for a URL parser; with digits in front
    # the rest even parses as a valid port, so the URL was accepted as host "user".
    pytest.param(f"5672{char}Pw9xQz7Lm", id=f"digits{char}")
    for char in "/#?"
] + [pytest.param(f"Pw9xQz7Lm{char}x", id=f"letters{char}") for char in "/#?"]


@pytest.mark.parametrize("password", AMBIGUOUS_PASSWORDS)
def test_unencoded_slash_hash_or_question_mark_in_the_password_is_refused_without_echo(
    password: str,
) -> None:
    url = f"amqp://user:{password}@broker.example:5672/"
    problems = problems_of(None, {"DISPATCHD_AMQP__URL": url})
    assert list(problems) == ["amqp.url"]
    assert "percent-encode" in problems["amqp.url"]
    assert "Pw9xQz7Lm" not in problems["amqp.url"]
    assert "amqp://user:***@broker.example:5672/" in problems["amqp.url"]


def test_a_percent_encoded_password_is_accepted_and_both_forms_are_secret() -> None:
    config = load_config(None, {"DISPATCHD_AMQP__URL": "amqp://user:Pw9%2Fx%23y@broker/"})
    assert str(config.amqp.url) == "amqp://user:***@broker/"
    assert {"Pw9%2Fx%23y", "Pw9/x#y"} <= set(config.secret_values())


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://user:Pw9xQz7Lm/x@host:5672/", "amqp://user:***@host:5672/"),
        ("amqp://user:Pw9#x@host/", "amqp://user:***@host/"),
        ("amqp://user:Pw9?x@host/v", "amqp://user:***@host/v"),
        ("amqp://user:p@ss@host/", "amqp://user:***@host/"),
        ("amqp://us/er:pw@host/", "amqp://***@host/"),
        ("amqp://:pw@host/", "amqp://:***@host/"),
        ("amqp://[::1/", "amqp://[::1/"),
    ],
)
def test_mask_url_hides_everything_up_to_the_last_at(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_redact_urls_masks_every_url_in_free_text() -> None:
    text = "tried amqp://a:Secret1/x@h1/ then (amqps://b:Secret2#y@h2:5671) and grpc://h3:1"
    assert redact_urls(text) == (
        "tried amqp://a:***@h1/ then (amqps://b:***@h2:5671) and grpc://h3:1"
    )


# ----------------------------------------------------- what check-config and run refuse


def test_a_sound_configuration_has_no_local_problems(tmp_path: Path) -> None:
    assert local_problems(load_config(None, {"DISPATCHD_STATE__DIR": str(tmp_path / "s")})) == []


@pytest.mark.parametrize(
    ("env", "key", "words"),
    [
        ({"DISPATCHD_AMQP__EXCHANGE": "amq.topic"}, "amqp.exchange", ["amq.", "reserved"]),
        ({"DISPATCHD_API__URL": "grpc://api:443"}, "api.auth_key", ["api.url", "auth_key"]),
        ({"DISPATCHD_HTTP__LISTEN": "127.0.0.1:50051"}, "http.listen", ["api.local.listen"]),
        (
            {
                "DISPATCHD_HTTP__LISTEN": "0.0.0.0:7000",
                "DISPATCHD_API__LOCAL__LISTEN": "[::1]:7000",
            },
            "http.listen",
            ["7000"],
        ),
        (
            {
                "DISPATCHD_HTTP__LISTEN": "localhost:7001",
                "DISPATCHD_API__LOCAL__LISTEN": "127.0.0.1:7001",
            },
            "http.listen",
            ["7001"],
        ),
    ],
)
def test_local_problems_name_their_key(
    tmp_path: Path, env: dict[str, str], key: str, words: list[str]
) -> None:
    config = load_config(None, {"DISPATCHD_STATE__DIR": str(tmp_path), **env})
    problems = dict(local_problems(config))
    assert list(problems) == [key]
    for word in words:
        assert word in problems[key]


@pytest.mark.parametrize(
    "env",
    [
        # the daemon does not start the local API when api.url is set
        {
            "DISPATCHD_API__URL": "grpc://api:443",
            "DISPATCHD_API__AUTH_KEY": "k",
            "DISPATCHD_HTTP__LISTEN": "127.0.0.1:50051",
        },
        {"DISPATCHD_HTTP__LISTEN": "127.0.0.1:0", "DISPATCHD_API__LOCAL__LISTEN": "127.0.0.1:0"},
        {"DISPATCHD_HTTP__LISTEN": "127.0.0.1:7002", "DISPATCHD_API__LOCAL__LISTEN": "[::1]:7002"},
        {},
    ],
)
def test_listeners_that_do_not_collide_are_fine(tmp_path: Path, env: dict[str, str]) -> None:
    config = load_config(None, {"DISPATCHD_STATE__DIR": str(tmp_path), **env})
    assert local_problems(config) == []


def test_a_state_dir_that_is_a_file_or_under_a_file_is_a_problem(tmp_path: Path) -> None:
    a_file = tmp_path / "state"
    a_file.write_text("")
    for state_dir in (a_file, a_file / "below"):
        config = load_config(None, {"DISPATCHD_STATE__DIR": str(state_dir)})
        problems = dict(local_problems(config))
        assert list(problems) == ["state.dir"]
        assert str(a_file) in problems["state.dir"] and "not a directory" in problems["state.dir"]


def read_only_directory(tmp_path: Path) -> Path:
    """A directory this user cannot write to (root ignores modes, so a read-only one)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if not os.access(locked, os.W_OK):
        return locked
    if not os.access("/proc/sys", os.W_OK):
        return Path("/proc/sys")
    pytest.skip("no directory is read-only for this user")


def test_a_state_dir_that_is_not_writable_or_cannot_be_created_is_a_problem(
    tmp_path: Path,
) -> None:
    locked = read_only_directory(tmp_path)
    for state_dir in (locked, locked / "dispatchd"):
        config = load_config(None, {"DISPATCHD_STATE__DIR": str(state_dir)})
        problems = dict(local_problems(config))
        assert list(problems) == ["state.dir"]
        assert "not writable" in problems["state.dir"]


def test_state_url_is_a_postgresql_secret_masked_everywhere(tmp_path: Path) -> None:
    dsn = "postgresql://dispatchd:pg-pw%2F1@db:5432/dispatchd?password=pg-pw-2&sslmode=disable"
    (tmp_path / "dsn").write_text(dsn + "\n")
    config = load_config(None, {"DISPATCHD_STATE__URL_FILE": str(tmp_path / "dsn")})
    assert config.state.url is not None
    assert config.state.url.get_secret_value() == dsn
    shown = "postgresql://dispatchd:***@db:5432/dispatchd?password=***&sslmode=disable"
    assert str(config.state.url) == shown
    assert effective_config(config)["state"]["url"] == shown
    assert {"pg-pw%2F1", "pg-pw/1", "pg-pw-2"} <= set(config.secret_values())


def test_state_url_must_be_postgresql_and_is_shown_masked_when_refused() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(None, {"DISPATCHD_STATE__URL": "mysql://u:hidden@db/x"})
    ((key, message),) = raised.value.problems
    assert key == "state.url"
    assert "postgresql" in message and "hidden" not in message


def test_cluster_defaults_name_the_replica_uniquely() -> None:
    config = load_config(None, {})
    assert config.cluster.lease_seconds == 10
    assert config.cluster.replica_id is None  # chosen once per process by the daemon
    first, second = default_replica_id(), default_replica_id()
    assert first != second
    assert first.startswith(f"{socket.gethostname()}-{os.getpid()}-")
    named = load_config(None, {"DISPATCHD_CLUSTER__REPLICA_ID": "replica-a"})
    assert named.cluster.replica_id == "replica-a"
    with pytest.raises(ConfigError) as raised:
        load_config(None, {"DISPATCHD_CLUSTER__LEASE_SECONDS": "0.5"})
    assert [key for key, _ in raised.value.problems] == ["cluster.lease_seconds"]

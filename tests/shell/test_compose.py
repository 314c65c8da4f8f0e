"""docker-compose.yml and the Dockerfile, checked without Docker.

Docker does not run here, so these tests check what can break silently: files
that are referenced but missing, commands and settings that dispatchd does not
know, ports that do not line up, and the image's health check and entry point.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from dispatchd import cli
from dispatchd.config import load_config, local_problems
from dispatchd.localapi.server import LocalApiServer
from dispatchd.settings import LocalApiConfig, Settings, split_host_port

REPO = Path(__file__).resolve().parents[2]
DISPATCHD_SERVICES = ("api", "dispatchd")
REPLICAS = ("replica-1", "replica-2", "replica-3")


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


def services() -> dict[str, Any]:
    result: dict[str, Any] = compose()["services"]
    return result


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile(keyword: str) -> list[str]:
    return [rest for key, rest in dockerfile_instructions() if key == keyword]


def image_env() -> dict[str, str]:
    """The runtime stage's ENV (the last stage, after the last FROM)."""
    instructions = dockerfile_instructions()
    last_from = max(i for i, (key, _) in enumerate(instructions) if key == "FROM")
    env: dict[str, str] = {}
    for key, rest in instructions[last_from:]:
        if key == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def service_settings(name: str) -> Settings:
    """What dispatchd would load inside that container: image ENV, then compose env."""
    env = {**image_env(), **{k: str(v) for k, v in services()[name]["environment"].items()}}
    return load_config(None, env)


def container_ports(name: str) -> set[int]:
    return {int(str(mapping).rsplit(":", 1)[1]) for mapping in services()[name]["ports"]}


def test_every_referenced_file_exists() -> None:
    for name, service in services().items():
        if "build" in service:
            context = REPO / str(service["build"])
            assert (context / "Dockerfile").is_file(), name
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: {source}"
    for copy in dockerfile("COPY"):
        if copy.startswith("--from"):
            continue
        *sources, _ = copy.split()
        for source in sources:
            assert (REPO / source).exists(), source
            assert source.rstrip("/") not in dockerignore(), f"{source} is in .dockerignore"


def dockerignore() -> set[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return {line.strip().rstrip("/") for line in lines if line.strip() and line[0] != "#"}


def test_dispatchd_services_run_real_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    image = {service.get("image") for service in services().values() if "build" in service}
    assert image == {"dispatchd:local"}  # both dispatchd services share one image
    for name in DISPATCHD_SERVICES:
        command = services()[name]["command"]
        assert cli.main([*command, "--help"]) == 0, name
        assert capsys.readouterr().out.startswith(f"usage: dispatchd {command[0]}")
    assert services()["api"]["command"] == ["api"]
    assert services()["dispatchd"]["command"] == ["run"]
    assert cli.main([*json.loads(dockerfile("CMD")[0]), "--help"]) == 0


@pytest.mark.parametrize("name", DISPATCHD_SERVICES)
def test_every_dispatchd_variable_is_a_real_setting(name: str) -> None:
    environment = services()[name]["environment"]
    assert all(key.startswith("DISPATCHD_") for key in environment)
    service_settings(name)  # raises ConfigError naming any unknown or invalid variable


def test_the_image_environment_is_valid_configuration() -> None:
    settings = load_config(None, image_env())
    assert settings.state.dir == Path("/var/lib/dispatchd")
    assert settings.log.format == "json"


def test_api_service_listens_where_dispatchd_connects_and_its_health_check_looks() -> None:
    api = service_settings("api")
    daemon = service_settings("dispatchd")
    _, api_port = split_host_port(api.api.local.listen)
    assert api_port in container_ports("api")
    assert daemon.api.url is not None
    target = urlsplit(daemon.api.url)
    assert (target.hostname, target.port) == ("api", api_port)
    assert "ssl=false" in target.query  # dispatchd api serves plain gRPC
    health = services()["api"]["healthcheck"]["test"]
    assert health[:3] == ["CMD", "python", "-c"]
    assert "DISPATCHD_API__LOCAL__LISTEN" in health[3]  # the port it listens on


def test_dispatchd_service_reaches_the_broker_and_exposes_http() -> None:
    daemon = service_settings("dispatchd")
    broker = urlsplit(daemon.amqp.url.get_secret_value())
    assert broker.hostname == "rabbitmq"
    assert broker.port in container_ports("rabbitmq")
    host, http_port = split_host_port(daemon.http.listen)
    assert host == "0.0.0.0"  # reachable from Prometheus and the health check
    assert http_port in container_ports("dispatchd")
    assert daemon.microgrid_ids


def test_dispatchd_service_passes_the_start_up_checks() -> None:
    """``run`` would refuse it otherwise; ``state.dir`` is a volume only the container has."""
    problems = local_problems(service_settings("dispatchd"))
    assert [(key, message) for key, message in problems if key != "state.dir"] == []


def test_dispatchd_waits_for_healthy_dependencies() -> None:
    depends = services()["dispatchd"]["depends_on"]
    assert depends == {
        "rabbitmq": {"condition": "service_healthy"},
        "api": {"condition": "service_healthy"},
    }
    for name in depends:
        assert services()[name]["healthcheck"]["test"], name
    assert re.fullmatch(r"rabbitmq:3\.\d+\.\d+-management", services()["rabbitmq"]["image"])
    assert services()["rabbitmq"]["healthcheck"]["test"] == [
        "CMD",
        "rabbitmq-diagnostics",
        "-q",
        "ping",
    ]
    assert {5672, 15672} <= container_ports("rabbitmq")


def mounts(name: str) -> dict[str, str]:
    """Container path -> repository path of a service's bind mounts."""
    found: dict[str, str] = {}
    for volume in services()[name].get("volumes", []):
        source, target, *_ = str(volume).split(":")
        if source.startswith("."):
            found[target] = source
    return found


def test_prometheus_scrapes_dispatchd_and_rabbitmq_and_loads_the_alerts() -> None:
    mounted = mounts("prometheus")
    config_path = "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((REPO / mounted[config_path]).read_text())
    targets = {
        job["job_name"]: [
            address for static in job["static_configs"] for address in static["targets"]
        ]
        for job in config["scrape_configs"]
    }
    _, http_port = split_host_port(service_settings("dispatchd").http.listen)
    replicas = [
        f"{name}:{split_host_port(service_settings(name).http.listen)[1]}" for name in REPLICAS
    ]
    assert targets == {
        "dispatchd": [f"dispatchd:{http_port}"],
        "rabbitmq": ["rabbitmq:15692"],
        "dispatchd-cluster": replicas,  # one job: the cluster alerts sum over it
    }
    # Rule files resolve against the config file's directory, in the container too.
    for rule_file in config["rule_files"]:
        in_container = str(Path(config_path).parent / rule_file)
        assert mounted[in_container] == "./deploy/prometheus/alerts.yml"
    assert set(services()["prometheus"]["depends_on"]) == {"dispatchd", "rabbitmq"}


def test_rabbitmq_serves_its_prometheus_endpoint() -> None:
    plugins = (REPO / mounts("rabbitmq")["/etc/rabbitmq/enabled_plugins"]).read_text()
    assert re.fullmatch(r"\[rabbitmq_management,\s*rabbitmq_prometheus\]\.\s*", plugins)


def test_grafana_gets_the_prometheus_datasource_and_the_dashboard() -> None:
    grafana = services()["grafana"]
    mounted = mounts("grafana")
    datasources = yaml.safe_load(
        (REPO / mounted["/etc/grafana/provisioning/datasources"] / "prometheus.yml").read_text()
    )["datasources"]
    (datasource,) = datasources
    assert datasource["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in services()["prometheus"]["ports"]
    provider = yaml.safe_load(
        (REPO / mounted["/etc/grafana/provisioning/dashboards"] / "dispatchd.yml").read_text()
    )["providers"][0]
    dashboards = provider["options"]["path"]
    assert (REPO / mounted[dashboards] / "dispatchd.json").is_file()
    dashboard = json.loads((REPO / mounted[dashboards] / "dispatchd.json").read_text())
    uids = {
        target["datasource"]["uid"] for panel in dashboard["panels"] for target in panel["targets"]
    }
    assert uids == {datasource["uid"]}
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards}/dispatchd.json"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]


def test_every_published_port_is_on_loopback_only() -> None:
    published = {
        name: [str(port) for port in service.get("ports", [])]
        for name, service in services().items()
    }
    assert {name for name, ports in published.items() if ports} == {
        "rabbitmq",
        "api",
        "dispatchd",
        "prometheus",
        "grafana",
        "postgres",
        *REPLICAS,
    }
    for name, ports in published.items():
        for port in ports:
            host, _, _ = port.rpartition(":")
            assert host.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_every_service_restarts_and_every_image_is_pinned() -> None:
    for name, service in services().items():
        assert service["restart"] == "unless-stopped", name
        image = str(service["image"])
        if "build" in service:
            continue  # built from this repository
        repository, _, tag = image.rpartition(":")
        # PostgreSQL's releases have two parts since version 10 (16.4 is a patch release).
        full = r"\d+\.\d+" if repository == "postgres" else r"v?\d+\.\d+\.\d+"
        assert repository and re.fullmatch(full + r"(-\S+)?", tag), f"{name}: {image} is not pinned"


def api_health_check(listen: str) -> Any:
    """The api service's health check as a subprocess, told the address to check."""
    command = services()["api"]["healthcheck"]["test"]
    return asyncio.create_subprocess_exec(
        sys.executable,
        *command[2:],
        env={"DISPATCHD_API__LOCAL__LISTEN": listen},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def run_api_health_check(listen: str) -> int:
    process = await api_health_check(listen)
    async with asyncio.timeout(30):
        return await process.wait()


async def test_api_health_check_passes_against_dispatchd_api(tmp_path: Path) -> None:
    local = LocalApiConfig(listen="127.0.0.1:0", database=tmp_path / "api.sqlite3")
    server = LocalApiServer.from_config(local)
    port = await server.start()
    try:
        assert await run_api_health_check(f"0.0.0.0:{port}") == 0
    finally:
        await server.stop(0)


async def test_api_health_check_fails_on_a_port_that_speaks_no_grpc(livez_server: int) -> None:
    """Unlike a bare TCP connect, the check needs a gRPC (HTTP/2) server."""
    assert await run_api_health_check(f"0.0.0.0:{livez_server}") != 0


def test_stop_grace_period_outlasts_the_shutdown_timeout() -> None:
    grace = str(services()["dispatchd"]["stop_grace_period"])
    assert grace.endswith("s")
    assert float(grace[:-1]) > service_settings("dispatchd").shutdown_timeout


def test_dockerfile_is_multi_stage_non_root_with_exec_form_entrypoint() -> None:
    assert len(dockerfile("FROM")) >= 2
    assert any("--from=build" in copy for copy in dockerfile("COPY"))
    (user,) = dockerfile("USER")
    assert user not in ("root", "0")
    (entrypoint,) = dockerfile("ENTRYPOINT")
    assert json.loads(entrypoint) == ["dispatchd"]
    (command,) = dockerfile("CMD")
    assert json.loads(command) == ["run"]


def health_check_command() -> list[str]:
    (healthcheck,) = dockerfile("HEALTHCHECK")
    _, _, exec_form = healthcheck.partition("CMD ")
    command: list[str] = json.loads(exec_form)
    return command


class _LivezOnly(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/livez" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads exit codes, not access logs."""


@pytest.fixture
def livez_server() -> Iterator[int]:
    server = HTTPServer(("127.0.0.1", 0), _LivezOnly)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def run_health_check(env_listen: str) -> int:
    command = health_check_command()
    assert command[0] == "python"
    done = subprocess.run(
        [sys.executable, *command[1:]],
        env={"DISPATCHD_HTTP__LISTEN": env_listen},
        capture_output=True,
        timeout=30,
        check=False,
    )
    return done.returncode


def test_image_health_check_asks_livez_on_the_http_port(livez_server: int) -> None:
    assert "/livez" in " ".join(health_check_command())
    assert run_health_check(f"0.0.0.0:{livez_server}") == 0


def test_image_health_check_fails_when_nothing_answers() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        unused_port = closed.getsockname()[1]
    assert run_health_check(f"0.0.0.0:{unused_port}") != 0


def test_readme_test_command_is_exactly_what_ci_runs() -> None:
    ci_lines = [
        line
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    test_command = ci_lines[-1]
    assert "pytest" in test_command
    readme = (REPO / "README.md").read_text()
    shell_blocks = readme.split("```sh\n")[1:]
    assert any(block.split("```")[0].strip() == test_command for block in shell_blocks[:2])


def test_readme_links_resolve() -> None:
    readme = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#:]+)\)", readme):
        assert (REPO / target).exists(), target


# ------------------------------------------------------------- the cluster profile


def test_the_cluster_profile_adds_postgres_and_three_replicas_only() -> None:
    profiled = {name for name, service in services().items() if service.get("profiles")}
    assert profiled == {"postgres", *REPLICAS}
    for name in profiled:
        assert services()[name]["profiles"] == ["cluster"], name


@pytest.mark.parametrize("name", REPLICAS)
def test_every_replica_variable_is_a_real_setting(name: str) -> None:
    environment = services()[name]["environment"]
    assert all(key.startswith("DISPATCHD_") for key in environment)
    settings = service_settings(name)
    assert [(k, m) for k, m in local_problems(settings) if k != "state.dir"] == []
    assert services()[name]["command"] == ["run"]
    assert services()[name]["image"] == "dispatchd:local"


def test_replicas_share_microgrids_exchange_and_database_under_their_own_names() -> None:
    replicas = [service_settings(name) for name in REPLICAS]
    assert len({tuple(s.microgrid_ids) for s in replicas}) == 1
    assert len(replicas[0].microgrid_ids) >= len(REPLICAS)  # each one gets a share
    assert len({s.amqp.exchange for s in replicas}) == 1
    assert len({s.state.url.get_secret_value() for s in replicas if s.state.url}) == 1
    assert len({s.cluster.replica_id for s in replicas}) == len(REPLICAS)
    # The single-process daemon consumes its exchange's RPC queue exclusively: a
    # replica on the same exchange would be refused at start.
    assert replicas[0].amqp.exchange != service_settings("dispatchd").amqp.exchange


def test_replicas_reach_the_database_the_postgres_service_creates() -> None:
    replica = service_settings(REPLICAS[0])
    assert replica.state.url is not None
    url = urlsplit(replica.state.url.get_secret_value())
    postgres = services()["postgres"]
    assert url.scheme == "postgresql"
    assert (url.hostname, url.port) == ("postgres", 5432)
    assert 5432 in container_ports("postgres")
    assert url.username == postgres["environment"]["POSTGRES_USER"]
    assert url.password == postgres["environment"]["POSTGRES_PASSWORD"]
    assert url.path == "/" + postgres["environment"]["POSTGRES_DB"]
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]


@pytest.mark.parametrize("name", REPLICAS)
def test_replicas_wait_for_their_dependencies_and_hand_over_before_being_killed(name: str) -> None:
    service = services()[name]
    assert service["depends_on"] == {
        "rabbitmq": {"condition": "service_healthy"},
        "api": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
    }
    settings = service_settings(name)
    host, http_port = split_host_port(settings.http.listen)
    assert host == "0.0.0.0"
    assert http_port in container_ports(name)
    grace = str(service["stop_grace_period"])
    assert float(grace.removesuffix("s")) > settings.shutdown_timeout

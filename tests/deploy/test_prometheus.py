"""deploy/prometheus: the shipped config and alert rules, checked and unit-tested by promtool.

``promtool`` comes with Debian's ``prometheus`` package (.ci/run installs it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = Path(__file__).with_name("alerts_test.yml")


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed (.ci/run installs Debian's prometheus package)")
    return subprocess.run(
        [found, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def rules() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return data


def alert_names() -> list[str]:
    return [rule["alert"] for group in rules()["groups"] for rule in group["rules"]]


def test_the_shipped_prometheus_config_is_valid() -> None:
    done = promtool("check", "config", PROMETHEUS / "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout + done.stderr


def test_the_alert_rules_pass_their_unit_tests() -> None:
    done = promtool("test", "rules", RULE_TESTS)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_tested_and_has_a_runbook() -> None:
    tested = yaml.safe_load(RULE_TESTS.read_text())
    cases = [case for test in tested["tests"] for case in test["alert_rule_test"]]
    firing = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert firing == set(alert_names())
    assert quiet == set(alert_names())
    runbook = (REPO / "docs" / "monitoring.md").read_text()
    for group in rules()["groups"]:
        for rule in group["rules"]:
            anchor = rule["annotations"]["runbook"].split("#", 1)[1]
            assert anchor == rule["alert"].lower()
            assert f"### {rule['alert']}" in runbook, rule["alert"]


@pytest.mark.parametrize("alert", alert_names())
@pytest.mark.parametrize(
    ("mutation", "expr"),
    [("never fires", "vector(1) == 2"), ("always fires", "vector(1)")],
)
def test_the_unit_tests_catch_an_alert_that_is_broken(
    alert: str, mutation: str, expr: str, tmp_path: Path
) -> None:
    """Each alert's tests fail if it never fires, or fires all the time: no case is idle."""
    broken = rules()
    for group in broken["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == alert:
                rule["expr"] = expr
                rule.pop("for", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(broken))
    tests = yaml.safe_load(RULE_TESTS.read_text())
    tests["rule_files"] = [str(tmp_path / "alerts.yml")]
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests))
    done = promtool("test", "rules", tmp_path / "alerts_test.yml")
    assert done.returncode != 0, f"{alert} {mutation} and its tests still pass"
    assert f"alertname: {alert}," in done.stdout + done.stderr

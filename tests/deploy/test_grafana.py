"""deploy/grafana: the dashboard is valid JSON and queries only metrics dispatchd exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from dispatchd import metrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "dispatchd.json"
TARGET_LABELS = {"instance", "job"}
"""Added by Prometheus to every scraped series."""
SERIES = re.compile(r"\b(dispatchd_[a-z_]+)\b(\{[^}]*\})?")
GROUPING = re.compile(r"\bby \(([^)]*)\)")


def series_labels() -> dict[str, set[str]]:
    """Every series name dispatchd can export -> its label names (histograms: with ``le``).

    Read from the metric objects, not from a scrape: a labelled metric shows
    no sample until its first child exists.
    """
    found: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        labels = set(value._labelnames)
        for family in value.describe():
            if family.type == "counter":
                found[f"{family.name}_total"] = labels
            elif family.type == "histogram":
                found[f"{family.name}_bucket"] = labels | {"le"}
                found[f"{family.name}_count"] = labels
                found[f"{family.name}_sum"] = labels
            else:
                found[family.name] = labels
    return found


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def expressions() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


def test_dashboard_is_valid_json_with_unique_panel_ids() -> None:
    board = dashboard()
    assert board["uid"] == "dispatchd"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_every_metric_the_dashboard_queries_exists_with_its_labels() -> None:
    known = series_labels()
    queried: set[str] = set()
    for expr in expressions():
        matches = SERIES.findall(expr)
        assert matches, expr
        for name, selector in matches:
            assert name in known, f"{name} (in {expr}) is not in dispatchd.metrics"
            queried.add(name)
            allowed = known[name] | TARGET_LABELS
            for label in re.findall(r"(\w+)\s*[=!~]", selector):
                assert label in allowed, f"{name} has no label {label}: {expr}"
            for grouping in GROUPING.findall(expr):
                for label in filter(None, (part.strip() for part in grouping.split(","))):
                    assert label in allowed, f"{name} has no label {label}: {expr}"
    # What the dashboard is for: each of these has a panel.
    assert {
        "dispatchd_messages_published_total",
        "dispatchd_messages_unroutable_total",
        "dispatchd_outbox_messages",
        "dispatchd_transition_lateness_seconds_bucket",
        "dispatchd_api_stream_up",
        "dispatchd_api_reconnects_total",
        "dispatchd_dispatches",
        "dispatchd_broker_up",
        "dispatchd_rpc_requests_total",
        "dispatchd_ready",
        "dispatchd_microgrids_owned",
        "dispatchd_microgrids_configured",
        "dispatchd_cluster_replicas",
        "dispatchd_lease_acquired_total",
        "dispatchd_lease_released_total",
        "dispatchd_lease_lost_total",
        "dispatchd_store_commit_seconds_bucket",
    } <= queried


def test_each_lease_event_is_shown_per_replica() -> None:
    (panel,) = [p for p in dashboard()["panels"] if p["title"] == "Lease events"]
    for target in panel["targets"]:
        assert GROUPING.findall(target["expr"]) == ["instance"], target["expr"]


@pytest.mark.parametrize("title", ["Transition lateness", "Store commit latency"])
def test_the_latency_panels_show_p50_and_p99(title: str) -> None:
    (panel,) = [p for p in dashboard()["panels"] if p["title"] == title]
    quantiles = sorted(
        re.match(r"histogram_quantile\((0\.\d+),", target["expr"]).group(1)  # type: ignore[union-attr]
        for target in panel["targets"]
    )
    assert quantiles == ["0.5", "0.99"]


def test_the_alert_rules_query_only_metrics_dispatchd_exports() -> None:
    known = series_labels()
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            for name, _ in SERIES.findall(rule["expr"]):
                assert name in known, f"{rule['alert']}: {name}"

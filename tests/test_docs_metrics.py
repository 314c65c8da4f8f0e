"""Every metric dispatchd exports is in the operator's metrics table, and nothing else is."""

from __future__ import annotations

import re
from pathlib import Path

from dispatchd import metrics

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def exported_names() -> set[str]:
    return {
        family.name + ("_total" if family.type == "counter" else "")
        for family in metrics.REGISTRY.collect()
        if family.name.startswith("dispatchd_")
    }


def documented_names() -> set[str]:
    section = DOC.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(dispatchd_[a-z_]+)` \|", section, flags=re.MULTILINE))


def test_the_metrics_table_lists_exactly_the_exported_metrics() -> None:
    assert documented_names() == exported_names()

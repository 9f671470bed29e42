"""Every metric and label the dashboard and the alert rules name exists in the live exposition."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from service.metrics import GpuCollector
from tests.deploy.conftest import DASHBOARD, DEPLOY, RULES
from tests.service.test_metrics import FakeNvml

METRIC = re.compile(r"(?<![\w:$])((?:snipserve|process|python)_[a-z0-9_]+|up)(?![\w:(])")
SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
TARGET_LABELS = {"job", "instance"}  # added by Prometheus at scrape time


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    return exprs


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def exposed(text: str) -> dict[str, set[str]]:
    """Sample names a query may use -> label names seen on them (HELP/TYPE-only families included)."""
    names: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}.get(kind, ("",))
            for suffix in suffixes:
                names.setdefault(name + suffix, set())
        elif line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            name = name.split(" ")[0]
            labels = set(re.findall(r'(\w+)="', rest.rsplit("}", 1)[0])) if rest else set()
            names.setdefault(name, set()).update(labels)
    names.setdefault("up", set())
    return names


@pytest.fixture(scope="module")
def names(exposition: str) -> dict[str, set[str]]:
    # On this CPU-only machine the GPU families have no samples; learn their labels from a stub NVML.
    registry = CollectorRegistry()
    registry.register(GpuCollector(nvml_loader=FakeNvml))
    gpu = exposed(generate_latest(registry).decode())
    live = exposed(exposition)
    for name, labels in gpu.items():
        if name in live:
            live[name].update(labels)
    return live


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_expression_names_existing_metrics_and_labels(source: str, names: dict[str, set[str]]) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else rule_exprs()
    assert exprs
    for expr in exprs:
        used = set(METRIC.findall(expr))
        assert used, f"no metric found in {expr!r}"
        missing = used - set(names)
        assert not missing, f"{sorted(missing)} in {expr!r} are not in the live exposition"
        for metric, matchers in SELECTOR.findall(expr):
            unknown = set(MATCHER.findall(matchers)) - names.get(metric, set()) - TARGET_LABELS
            assert not unknown, f"labels {sorted(unknown)} are not on {metric} ({expr!r})"
        known = set().union(*(names[m] for m in used)) | TARGET_LABELS
        for group in GROUPING.findall(expr):
            unknown = {g.strip() for g in group.split(",") if g.strip()} - known
            assert not unknown, f"grouping labels {sorted(unknown)} exist on none of {sorted(used)} ({expr!r})"


def test_dashboard_covers_what_operators_asked_for() -> None:
    exprs = "\n".join(dashboard_exprs())
    for needed in (
        "snipserve_requests_total",
        "histogram_quantile(0.5, sum by (le) (rate(snipserve_request_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (le) (rate(snipserve_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(snipserve_request_duration_seconds_bucket",
        "snipserve_stage_duration_seconds_sum",
        "snipserve_batch_size_chips",
        "snipserve_batch_fill_ratio",
        "snipserve_queue_depth_chips",
        "snipserve_queue_capacity_chips",
        "snipserve_rejections_total",
        "snipserve_engine_errors_total",
        'status=~"5.."',
        "snipserve_chips_total",
        "snipserve_gpu_utilization_ratio",
        "snipserve_gpu_memory_used_bytes",
        "snipserve_model_info",
    ):
        assert needed in exprs, needed
    stage = next(p for p in dashboard()["panels"] if p["title"].startswith("Stage breakdown"))
    assert stage["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"


def test_dashboard_is_well_formed_and_uses_the_provisioned_datasource() -> None:
    board = dashboard()
    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    assert provisioned["datasources"][0]["type"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"]), panel["title"]
    assert board["uid"] == "snipserve"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/snipserve.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_rules_have_severity_and_text() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    assert {a["alert"] for a in alerts} >= {
        "SnipserveLatencyP99High",
        "SnipserveQueueSaturated",
        "SnipserveErrorRatioHigh",
        "SnipserveNotReady",
    }
    for alert in alerts:
        assert alert["labels"]["severity"] in {"page", "warning"}
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
        assert "for" in alert

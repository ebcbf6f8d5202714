"""scripts/k8s/optional/monitoring (issue 25, item 1): the PodMonitor scrapes the ports the
DaemonSet declares; every metric the alerts and the dashboard name is one Tencrypt exports
(core/exposition.py); promtool accepts the rules."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tencrypt.core.exposition import FAMILIES

yaml = pytest.importorskip("yaml")

K8S = Path(__file__).resolve().parents[2] / "scripts" / "k8s"
MONITORING = K8S / "optional" / "monitoring"


def metric_names(expr: str) -> set[str]:
    """The series names an expression reads (ours are tencrypt_* and process_*)."""
    return set(re.findall(r"\b((?:tencrypt|process)_[a-z0-9_]+)\b", expr))


def rules() -> list[dict]:
    doc = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return [r for g in doc["spec"]["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    doc = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in doc["panels"] for t in p["targets"]]


def test_every_metric_the_alerts_and_the_dashboard_read_is_exported() -> None:
    exprs = [r["expr"] for r in rules()] + dashboard_exprs()
    named = set().union(*(metric_names(e) for e in exprs))
    assert named and named <= set(FAMILIES), sorted(named - set(FAMILIES))
    alerts = {r["alert"] for r in rules()}
    assert {  # what the issue lists
        "TencryptPodUnpatched",
        "TencryptPeerUnanswered",
        "TencryptDropsRising",
        "TencryptRefusalsRising",
        "TencryptKeyMismatch",
        "TencryptPlaintextFallback",
        "TencryptAgentStale",
        "TencryptNodeSyncFailing",
    } <= alerts
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"]


def test_the_podmonitor_scrapes_the_ports_the_daemonset_declares() -> None:
    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    ds = next(
        d
        for d in yaml.safe_load_all((K8S / "daemonset.yaml").read_text())
        if d["kind"] == "DaemonSet"
    )
    ports = {p["name"] for c in ds["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    scraped = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    assert scraped == ports == {"agent-metrics", "sync-metrics"}
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["metadata"]["namespace"] == ds["metadata"]["namespace"]
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["podmonitor.yaml", "prometheusrule.yaml"]
    assert "monitoring" not in (K8S / "kustomization.yaml").read_text()  # never by default


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool (scripts/install.sh)")
def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    doc = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
    check = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(rules())} rules found" in check.stdout

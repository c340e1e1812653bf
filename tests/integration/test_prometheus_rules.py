"""The monitoring artefacts a user installs: generated from one source (hack/monitoring/generate.py),
checked by promtool, unit-tested with `promtool test rules`, rendered by the real helm, and a
dashboard whose every panel has a datasource and a unit."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.prometheus import REPO, monitoring_generator, promtool_binary
from tests.integration.test_chart_network_policy import one, render
from tests.integration.test_deploy_manifests import helm_binary  # noqa: F401  (fixture)

RULES = REPO / "manifests" / "monitoring" / "prometheus-rules.yaml"
DASHBOARD = REPO / "charts" / "libvirt-operator" / "files" / "dashboard.json"
BASE = "https://github.com/libvirt-operator/libvirt-operator/blob/main/rag"


@pytest.fixture(scope="module")
def promtool() -> str:
    from tests.harness.pytest_prometheus import require_prometheus

    require_prometheus()
    binary = promtool_binary()
    assert binary
    return binary


def test_committed_artefacts_match_the_generator() -> None:
    gen = monitoring_generator()
    stale = [str(p.relative_to(REPO)) for p, text in gen.outputs().items() if not p.exists() or p.read_text() != text]
    assert stale == [], f"run `make monitoring`: {stale}"


def test_every_alert_links_an_existing_runbook_in_rag() -> None:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert names == {"LibvirtOperatorDown", "LibvirtHostUnreachable", "LibvirtVMCrashLooping",
                     "LibvirtOperatorReconcileErrors", "LibvirtOperatorWorkQueueGrowing",
                     "LibvirtOperatorKnowledgeBaseDegraded", "LibvirtISOImportStalled"}
    for rule in rules:
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(BASE + "/"), url
        path, _, anchor = url[len(BASE) + 1:].partition("#")
        assert (REPO / "rag" / path).is_file(), url
        if anchor:  # GitHub's heading anchor: lower case, spaces to dashes
            headings = {line.lstrip("#").strip().lower().replace(" ", "-")
                        for line in (REPO / "rag" / path).read_text().splitlines() if line.startswith("## ")}
            assert anchor in headings, url
    by_name = {r["alert"]: r["annotations"]["runbook_url"] for r in rules}
    assert by_name["LibvirtHostUnreachable"].endswith("/runbooks/host-unreachable.md")
    assert by_name["LibvirtVMCrashLooping"].endswith("/runbooks/domain-crashed.md")
    assert by_name["LibvirtOperatorKnowledgeBaseDegraded"].endswith("/runbooks/database-error.md")
    assert by_name["LibvirtOperatorDown"].endswith("/guides/operator-alerts.md#operator-down")
    assert by_name["LibvirtOperatorWorkQueueGrowing"].endswith("/guides/operator-alerts.md#work-queue-growing")


def test_promtool_check_rules(promtool: str, tmp_path: Path, helm_binary: str) -> None:  # noqa: F811
    out = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 7 rules found" in out.stdout
    # The chart's PrometheusRule carries the same rules, with the user's runbook base URL.
    docs = render(helm_binary, tmp_path, "monitoring.prometheusRule.enabled=true",
                  "remediationBaseUrl=https://mirror.example/rag")
    spec = one(docs, "PrometheusRule")["spec"]
    chart_rules = tmp_path / "chart-rules.yaml"
    chart_rules.write_text(yaml.safe_dump(spec))
    out = subprocess.run([promtool, "check", "rules", str(chart_rules)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    urls = {r["annotations"]["runbook_url"] for r in spec["groups"][0]["rules"]}
    assert "https://mirror.example/rag/runbooks/host-unreachable.md" in urls
    assert all(u.startswith("https://mirror.example/rag/") for u in urls)


def _expand(text: str, labels: dict[str, str], value: str) -> str:
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), text)
    return text.replace("{{ $value }}", value)


# alert → (input series, eval minute before `for` elapses, eval minute after, labels of the alert, $value)
CASES: dict[str, tuple[list[tuple[str, str]], int, int, dict[str, str], str]] = {
    "LibvirtOperatorDown": ([('up{job="libvirt-operator-metrics",instance="10.0.0.5:8080"}', "1 1 0x20")], 4, 8,
                            {"job": "libvirt-operator-metrics", "instance": "10.0.0.5:8080"}, "0"),
    "LibvirtHostUnreachable": ([('libvirt_operator_host_ready{host="edge-1",job="j",instance="i"}', "1 0x30"),
                                ('libvirt_operator_host_ready{host="edge-2",job="j",instance="i"}', "1x30")], 6, 12,
                               {"host": "edge-1"}, "0"),
    "LibvirtVMCrashLooping": ([('libvirt_operator_virtual_machines{status="CrashLoopBackOff",job="j",instance="i"}', "0 2x30"),
                               ('libvirt_operator_virtual_machines{status="Running",job="j",instance="i"}', "5x30")], 6, 12,
                              {}, "2"),
    "LibvirtOperatorReconcileErrors": ([('controller_runtime_reconcile_errors_total{controller="virtualmachine",job="j",instance="i"}', "0+3x40"),
                                        ('controller_runtime_reconcile_errors_total{controller="libvirthost",job="j",instance="i"}', "7x40")], 10, 20,
                                       {"controller": "virtualmachine"}, "0.05"),
    "LibvirtOperatorWorkQueueGrowing": ([('workqueue_depth{name="virtualmachine",job="j",instance="i"}', "0+2x40"),
                                         ('workqueue_depth{name="isoimage",job="j",instance="i"}', "50x40")], 12, 30,
                                        {"name": "virtualmachine", "job": "j", "instance": "i"}, "60"),
    "LibvirtOperatorKnowledgeBaseDegraded": ([('libvirt_operator_knowledge_base_healthy{job="j",instance="i"}', "1 0x30")], 10, 20,
                                             {}, "0"),
    "LibvirtISOImportStalled": ([('libvirt_operator_resource_conditions{kind="ISOImage",condition="Stalled",status="True",job="j",instance="i"}', "0 1x30"),
                                 ('libvirt_operator_resource_conditions{kind="VirtualMachine",condition="Stalled",status="True",job="j",instance="i"}', "3x30")], 10, 20,
                                {}, "1"),
}


def test_promtool_unit_tests_fire_each_alert_only_after_its_for(promtool: str, tmp_path: Path) -> None:
    rules = {r["alert"]: r for r in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]}
    assert set(CASES) == set(rules)
    tests = []
    for alert, (series, before, after, labels, value) in CASES.items():
        rule = rules[alert]
        tests.append({
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series],
            "alert_rule_test": [
                {"eval_time": f"{before}m", "alertname": alert, "exp_alerts": []},
                {"eval_time": f"{after}m", "alertname": alert, "exp_alerts": [{
                    "exp_labels": {**labels, **rule["labels"]},
                    "exp_annotations": {k: _expand(v, labels, value) for k, v in rule["annotations"].items()},
                }]},
            ],
        })
    test_file = tmp_path / "alerts-test.yaml"
    test_file.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}))
    out = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_dashboard_panels_have_a_datasource_a_unit_and_do_not_overlap() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "libvirt-operator" and dash["title"] == "libvirt-operator"
    (var,) = dash["templating"]["list"]
    assert var["type"] == "datasource" and var["query"] == "prometheus"
    panels = _panels(dash)
    assert len(panels) >= 20
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        assert p["type"] == "timeseries"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["fieldConfig"]["defaults"]["unit"], p["title"]
        assert p["targets"] and all(t["expr"] and t["datasource"] == p["datasource"] for t in p["targets"])
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine


def metrics_service(docs: list[dict]) -> dict:
    """The Service of the metrics port (the console API has a Service of its own)."""
    (svc,) = [d for d in docs if d["kind"] == "Service" and "metrics" in [p.get("name") for p in d["spec"]["ports"]]]
    return svc


def test_chart_ships_the_dashboard_with_the_sidecar_label_and_monitoring_crs_on_request(tmp_path: Path,
                                                                                       helm_binary: str) -> None:  # noqa: F811
    docs = render(helm_binary, tmp_path)
    kinds = {d["kind"] for d in docs}
    assert "ServiceMonitor" not in kinds and "PrometheusRule" not in kinds  # need the Prometheus Operator's CRDs
    cm = one(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["libvirt-operator.json"]) == json.loads(DASHBOARD.read_text())

    docs = render(helm_binary, tmp_path, "monitoring.serviceMonitor.enabled=true",
                  "monitoring.serviceMonitor.labels.release=kube-prometheus-stack",
                  "monitoring.prometheusRule.enabled=true", "monitoring.dashboard.namespace=monitoring")
    sm, svc = one(docs, "ServiceMonitor"), metrics_service(docs)
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in sm["spec"]["endpoints"]] == [p["name"] for p in svc["spec"]["ports"]] == ["metrics"]
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert one(docs, "ConfigMap")["metadata"]["namespace"] == "monitoring"
    assert one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]


def test_plain_service_monitor_selects_the_plain_metrics_service() -> None:
    deploy = REPO / "manifests" / "deploy"
    svc = metrics_service([d for p in sorted(deploy.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d])
    sm = yaml.safe_load((REPO / "manifests" / "monitoring" / "servicemonitor.yaml").read_text())
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    assert sm["spec"]["endpoints"][0]["port"] in [p["name"] for p in svc["spec"]["ports"]]

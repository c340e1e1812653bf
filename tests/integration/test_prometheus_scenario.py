"""A real Prometheus scrapes the real operator (in-process, on the real apiserver) through the
operator's own metrics server while things go wrong the way they do for users: a host whose libvirt
refuses connections, a VM whose domain keeps crashing, an ISO whose checksum does not match, and
VMs converging on test:// hosts. Every dashboard panel's query and every alert's signal must
return data, the expected alerts must fire (the shipped rules with `for: 0s`) and resolve, and
when the metrics endpoint goes away, LibvirtOperatorDown fires."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import REGISTRY

from tests.harness.http_server import TestHTTPServer
from tests.harness.kube import Kube
from tests.harness.prometheus import Prometheus, monitoring_generator

VM, HOST, ISO = "virtualmachines", "libvirthosts", "isoimages"
N_VMS = 50
SCRAPE = "2s"        # a 2 s budget per scrape holds on a loaded 2-core machine (1 s did not, always)
RATE_WINDOW = "30s"  # Grafana's $__rate_interval is at least 4 scrape intervals


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def refused_port() -> int:
    """A loopback port nothing listens on (connecting is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dashboard_renderer() -> Any:
    """hack/monitoring/render.py: Grafana's variable expansion (shared with the picture it draws)."""
    spec = importlib.util.spec_from_file_location("lvop_monitoring_render",
                                                  Path(__file__).resolve().parents[2] / "hack" / "monitoring" / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return dashboard_renderer().panel_queries(dashboard, RATE_WINDOW)


def alert_signals(expr: str) -> list[str]:
    """The series an alert expression compares ("x > 10 and deriv(x[10m]) > 0" → x, deriv(x[10m]))."""
    parts = re.split(r"\s+(?:and|or)\s+", expr)
    return [re.sub(r"\s*(==|!=|>=|<=|>|<)\s*[\d.]+\s*$", "", p) for p in parts]


def firing(prom: Prometheus, alert: str, **labels: str) -> bool:
    return any(a["labels"].get("alertname") == alert and a["state"] == "firing"
               and all(a["labels"].get(k) == v for k, v in labels.items()) for a in prom.alerts())


def value(prom: Prometheus, expr: str) -> float:
    """The scalar an alert compares (0 when the expression has no series)."""
    return sum(float(r["value"][1]) for r in prom.query(expr))


STALLED = 'sum(libvirt_operator_resource_conditions{kind="ISOImage",condition="Stalled",status="True"})'
CRASHLOOPING = 'sum(libvirt_operator_virtual_machines{status="CrashLoopBackOff"})'


def wait(kube: Kube, what: str, predicate: Any, timeout: float = 30) -> Any:
    return kube.wait_for(predicate, timeout=timeout, interval=0.5, what=what)


def test_dashboard_and_alerts_on_a_real_prometheus(kube, operator, namespace, test_host_factory, metrics_server,
                                                   prometheus_factory, tmp_path: Path) -> None:
    gen = monitoring_generator()
    rules = tmp_path / "rules.yaml"  # the shipped alerts, without their `for:` (a test cannot wait 15 minutes)
    rules.write_text(yaml.safe_dump(gen.rule_groups(gen.DEFAULT_RUNBOOK_BASE, for_override="0s")))
    prom = prometheus_factory({"libvirt-operator": [metrics_server.address]}, [rules], interval=SCRAPE)
    # Runbook lookups start once the knowledge base has loaded its model (seconds after the operator
    # starts); until then errors get the fixed link and no lookup is measured.
    wait(kube, "knowledge base loaded",
         lambda: REGISTRY.get_sample_value("libvirt_operator_knowledge_base_healthy") == 1, timeout=120)
    wait(kube, "a first scrape", lambda: prom.query('up{job="libvirt-operator"} == 1'), timeout=20)
    # Objects of earlier tests in this session may still count (namespaces never finish terminating
    # here): the shared alerts are judged against these baselines.
    stalled_before, crashlooping_before = value(prom, STALLED), value(prom, CRASHLOOPING)
    started = time.time()

    # N VMs converging on two test:// hosts (placement by selector).
    zone = uniq("zone")
    hosts = []
    for i in range(2):
        name = uniq(f"prom-hv{i}")
        kube.create(HOST, {"metadata": {"name": name, "labels": {"zone": zone}},
                           "spec": {"uri": test_host_factory(name, cpus=64, memory_mib=65536)}})
        hosts.append(name)
    for name in hosts:
        kube.wait_condition(HOST, name, "Ready", "True", timeout=30)
    for i in range(N_VMS):
        kube.create(VM, {"metadata": {"name": f"vm-{i}"},
                         "spec": {"memory": "64Mi", "hostSelector": {"matchLabels": {"zone": zone}}}}, namespace)

    # A host whose libvirt refuses connections, and a VM that waits for it.
    outage = uniq("prom-down")
    kube.create(HOST, {"metadata": {"name": outage},
                       "spec": {"uri": f"qemu+tcp://127.0.0.1:{refused_port()}/system", "insecure": True}})
    kube.create(VM, {"metadata": {"name": "on-outage"}, "spec": {"memory": "64Mi", "hostRef": outage}}, namespace)

    # An ISO whose checksum does not match (downloaded from a loopback server, then refused).
    image = tmp_path / "image.iso"
    image.write_bytes(hashlib.sha256(b"seed").digest() * 4096)
    rt = operator.runtime
    original = rt.settings
    rt.settings = dataclasses.replace(original, iso_cache_dir=str(tmp_path / "iso-cache"))
    http = TestHTTPServer(image).__enter__()
    try:
        kube.create(ISO, {"metadata": {"name": "bad"},
                          "spec": {"source": {"url": http.url("/image")},
                                   "checksum": "sha256:" + hashlib.sha256(b"not the image").hexdigest(),
                                   "targets": {"hostNames": [hosts[0]]}}}, namespace)

        def running() -> bool:
            objs = kube.custom.list_namespaced_custom_object(
                "virt.libvirt-operator.io", "v1alpha1", namespace, VM)["items"]
            return sum((o.get("status") or {}).get("printableStatus") == "Running" for o in objs) >= N_VMS
        wait(kube, f"{N_VMS} VMs Running", running, timeout=60)
        kube.wait_condition(HOST, outage, "Ready", "False", timeout=30)
        kube.wait_condition(ISO, "bad", "Stalled", "True", namespace=namespace, timeout=30)

        # A VM whose domain crashes: powered off from outside → CrashLoopBackOff (backoff 10 s).
        crash = kube.create(VM, {"metadata": {"name": "crashy"}, "spec": {"memory": "64Mi", "hostRef": hosts[1]}},
                            namespace)
        uid = crash["metadata"]["uid"]
        wait(kube, "crashy Running", lambda: ((kube.get(VM, "crashy", namespace) or {}).get("status") or {})
             .get("printableStatus") == "Running")
        operator.call(lambda: operator.runtime.pool.get(hosts[1]).call(
            "test-crash", lambda c: c.lookupByUUIDString(uid).destroy()))

        # The alerts fire, for the objects of this test.
        wait(kube, "LibvirtVMCrashLooping firing for crashy", lambda: firing(prom, "LibvirtVMCrashLooping")
             and value(prom, CRASHLOOPING) > crashlooping_before, timeout=15)
        wait(kube, "LibvirtHostUnreachable firing for the outage host",
             lambda: firing(prom, "LibvirtHostUnreachable", host=outage), timeout=20)
        wait(kube, "reconcile errors firing", lambda: firing(prom, "LibvirtOperatorReconcileErrors",
                                                             controller="virtualmachine"), timeout=20)
        wait(kube, "LibvirtISOImportStalled firing for bad", lambda: firing(prom, "LibvirtISOImportStalled")
             and value(prom, STALLED) == stalled_before + 1, timeout=20)
        assert not firing(prom, "LibvirtHostUnreachable", host=hosts[0])  # the healthy hosts do not alert
        alert = next(a for a in prom.alerts() if a["labels"]["alertname"] == "LibvirtHostUnreachable"
                     and a["labels"].get("host") == outage)
        assert alert["annotations"]["runbook_url"].endswith("/rag/runbooks/host-unreachable.md")

        # Every dashboard panel's query has data (a real value, not NaN) for this scenario.
        time.sleep(3)
        now = time.time()
        dashboard = gen.dashboard()
        empty = [(title, expr) for title, expr in panel_queries(dashboard) if not prom.has_data(expr, started, now)]
        kb = operator.runtime.remediator
        assert empty == [], (f"panels without data: {empty}; knowledge base lookups observed: "
                             f"{REGISTRY.get_sample_value('libvirt_operator_knowledge_base_lookup_duration_seconds_count')}"
                             f", cache hits/misses {getattr(kb, 'hits', '?')}/{getattr(kb, 'misses', '?')}; scrapes: "
                             f"{prom.query('sum_over_time(up[5m])')} up of {prom.query('count_over_time(up[5m])')}, "
                             f"slowest {prom.query('max_over_time(scrape_duration_seconds[5m])')}")
        # … and every alert's signal.
        silent = [(r["alert"], s) for r in gen.rule_groups("x")["groups"][0]["rules"]
                  for s in [alert_signals(r["expr"])] if not any(prom.has_data(x, started, now) for x in s)]
        assert silent == [], f"alert expressions without data: {silent}"

        # They resolve: the crash loop backs off and restarts, the host and the ISO are deleted.
        kube.delete(HOST, outage)
        kube.delete(VM, "on-outage", namespace)
        kube.delete(ISO, "bad", namespace)
        wait(kube, "LibvirtHostUnreachable resolved", lambda: not firing(prom, "LibvirtHostUnreachable", host=outage),
             timeout=30)
        # (resolved when nothing else is stalled or crash-looping; else back to what it was)
        wait(kube, "LibvirtISOImportStalled resolved", lambda: value(prom, STALLED) == stalled_before and (
            stalled_before > 0 or not firing(prom, "LibvirtISOImportStalled")), timeout=30)
        wait(kube, "LibvirtVMCrashLooping resolved", lambda: value(prom, CRASHLOOPING) <= crashlooping_before and (
            crashlooping_before > 0 or not firing(prom, "LibvirtVMCrashLooping")), timeout=30)
        # The deleted host's series are gone from /metrics, the others' are not.
        assert prom.query(f'libvirt_operator_host_ready{{host="{hosts[0]}"}}')
        wait(kube, "the deleted host's series gone", lambda: not prom.query(f'{{host="{outage}"}}'), timeout=15)
    finally:
        http.__exit__(None, None, None)
        rt.settings = original
        for name in hosts:
            kube.delete(HOST, name)

    # The operator's metrics go away: LibvirtOperatorDown.
    assert not firing(prom, "LibvirtOperatorDown")
    metrics_server.stop()
    wait(kube, "LibvirtOperatorDown firing", lambda: firing(prom, "LibvirtOperatorDown", job="libvirt-operator"),
         timeout=15)

    # LIBVIRT_OPERATOR_DASHBOARD_PNG=<path>: the dashboard drawn from this scenario (make dashboard-picture).
    if png := os.environ.get("LIBVIRT_OPERATOR_DASHBOARD_PNG"):
        render = dashboard_renderer()
        render.render(json.loads(render.DASHBOARD.read_text()), prom.url, started - 5, time.time(), Path(png),
                      rate_interval=RATE_WINDOW)

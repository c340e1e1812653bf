"""Generate the monitoring artefacts from one source: the Grafana dashboard (grafanalib), the
Prometheus alert rules, and their plain-manifest forms.

    python hack/monitoring/generate.py            # write them
    python hack/monitoring/generate.py --check    # exit 1 when a committed file differs (a test runs this)

Outputs: charts/libvirt-operator/files/{dashboard.json,alerts.yaml} (the chart reads them) and
manifests/monitoring/*.yaml (ServiceMonitor, PrometheusRule, dashboard ConfigMap, plain rules file),
manifests/argocd/argocd-cm-patch.yaml (the Argo CD health check manifests/argocd/health.lua for every kind).
Every metric is described in docs/metrics.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml
from grafanalib import core as G
from grafanalib._gen import DashboardEncoder

REPO = Path(__file__).resolve().parents[2]
CHART_FILES = REPO / "charts" / "libvirt-operator" / "files"
MANIFESTS = REPO / "manifests" / "monitoring"
DEFAULT_RUNBOOK_BASE = "https://github.com/libvirt-operator/libvirt-operator/blob/main/rag"  # = Settings' default
RUNBOOK_PLACEHOLDER = "RUNBOOK_BASE_URL"   # the chart replaces it with monitoring.runbookBaseUrl
JOB = 'job=~".*libvirt-operator.*"'         # the ServiceMonitor's job is the metrics Service's name
RATE = "$__rate_interval"
DS = {"type": "prometheus", "uid": "${datasource}"}

# --------------------------------------------------------------------------------------------
# Dashboard
# --------------------------------------------------------------------------------------------

# (title, unit, [(expr, legend)], description)
PANELS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]], str]]]] = [
    ("Reconciles", [
        ("Reconciles by result", "ops",
         [(f"sum by (controller, result) (rate(controller_runtime_reconcile_total[{RATE}]))", "{{controller}} {{result}}")],
         "Reconciles per second. result=error: the reconcile ended in an error (raised, or wrote one to the status)."),
        ("Reconcile errors", "ops",
         [(f"sum by (controller) (rate(controller_runtime_reconcile_errors_total[{RATE}]))", "{{controller}}")],
         "Reconciles that ended in an error, per second."),
        ("Reconcile duration (p50, p99)", "s",
         [(f"histogram_quantile(0.99, sum by (controller, le) (rate(controller_runtime_reconcile_time_seconds_bucket[{RATE}])))", "p99 {{controller}}"),
          (f"histogram_quantile(0.5, sum by (controller, le) (rate(controller_runtime_reconcile_time_seconds_bucket[{RATE}])))", "p50 {{controller}}")],
         "Time per reconcile (idle timer ticks are not reconciles)."),
        ("Errors by code", "ops",
         [(f"sum by (kind, code) (rate(libvirt_operator_errors_total[{RATE}]))", "{{kind}} {{code}}")],
         "Errors written to status, by error code (see the runbooks in rag/runbooks)."),
    ]),
    ("Work queues", [
        ("Queue depth", "short",
         [("sum by (name) (workqueue_depth)", "{{name}}")],
         "Keys due and not yet picked up (backing-off keys are not counted)."),
        ("Queue wait (p99)", "s",
         [(f"histogram_quantile(0.99, sum by (name, le) (rate(workqueue_queue_duration_seconds_bucket[{RATE}])))", "{{name}}")],
         "From due to picked up."),
        ("Work duration (p99)", "s",
         [(f"histogram_quantile(0.99, sum by (name, le) (rate(workqueue_work_duration_seconds_bucket[{RATE}])))", "{{name}}")],
         "Time to process one key."),
        ("Retries and longest running", "short",
         [(f"sum by (name) (rate(workqueue_retries_total[{RATE}]))", "retries/s {{name}}"),
          ("max by (name) (workqueue_longest_running_processor_seconds)", "longest running (s) {{name}}")],
         "Backoff retries per second, and the longest running processor (a stuck worker grows here)."),
    ]),
    ("Hosts and VMs", [
        ("Hosts ready", "bool",
         [("max by (host) (libvirt_operator_host_ready)", "{{host}}")],
         "1: the host's last probe left it Ready."),
        ("libvirt call duration (p99)", "s",
         [(f"histogram_quantile(0.99, sum by (host, operation, le) (rate(libvirt_operator_libvirt_call_duration_seconds_bucket[{RATE}])))", "{{host}} {{operation}}")],
         "Duration of blocking libvirt calls, by host and operation."),
        ("libvirt calls in flight", "short",
         [("sum by (host) (libvirt_operator_libvirt_calls_in_flight)", "{{host}}")],
         "Calls executing on each host right now (bounded by the host's maxConcurrentCalls)."),
        ("VirtualMachines by status", "short",
         [("sum by (status) (libvirt_operator_virtual_machines)", "{{status}}")],
         "status.printableStatus of the VirtualMachines the operator serves."),
        ("VM operations", "ops",
         [(f"sum by (operation) (rate(libvirt_operator_vm_operations_total[{RATE}]))", "{{operation}}")],
         "create / start / stop / delete / … per second."),
        ("Domain lifecycle events", "ops",
         [(f"sum by (host) (rate(libvirt_operator_domain_events_total[{RATE}]))", "{{host}}")],
         "libvirt lifecycle events received per host."),
    ]),
    ("ISO images", [
        ("ISO bytes moved", "Bps",
         [(f"sum by (direction) (rate(libvirt_operator_iso_bytes_total[{RATE}]))", "{{direction}}")],
         "Downloaded from the source, uploaded to the hosts' pools."),
        ("ISO import failures", "ops",
         [(f"sum by (reason) (rate(libvirt_operator_iso_import_failures_total[{RATE}]))", "{{reason}}")],
         "Failed import attempts, by reason."),
        ("ISOImages by condition", "short",
         [('sum by (condition, status) (libvirt_operator_resource_conditions{kind="ISOImage"})', "{{condition}}={{status}}")],
         "Ready / Stalled conditions of the ISOImages."),
    ]),
    ("Operator process", [
        ("Operator up", "bool",
         [(f"up{{{JOB}}}", "{{instance}}")],
         "1 when Prometheus scrapes the operator's /metrics."),
        ("Kubernetes API latency (p99)", "s",
         [(f"histogram_quantile(0.99, sum by (verb, le) (rate(rest_client_request_duration_seconds_bucket[{RATE}])))", "{{verb}}")],
         "The operator's own Kubernetes API requests (status patches, Secrets, lists)."),
        ("Kubernetes API requests", "reqps",
         [(f"sum by (method, code) (rate(rest_client_requests_total[{RATE}]))", "{{method}} {{code}}")],
         "By HTTP method and status code."),
        ("Knowledge base lookups (p99) and health", "s",
         [(f"histogram_quantile(0.99, sum by (le) (rate(libvirt_operator_knowledge_base_lookup_duration_seconds_bucket[{RATE}])))", "lookup p99"),
          ("min(libvirt_operator_knowledge_base_healthy)", "healthy (1/0)")],
         "Runbook lookups for error statuses; healthy=0: fixed per-code links are served (DATABASE_ERROR)."),
        ("Memory (RSS)", "bytes",
         [(f"process_resident_memory_bytes{{{JOB}}}", "{{instance}}")],
         "Resident memory of the operator process."),
        ("CPU", "percentunit",
         [(f"rate(process_cpu_seconds_total{{{JOB}}}[{RATE}])", "{{instance}}")],
         "CPU used by the operator process (1 = one core)."),
    ]),
]


def dashboard() -> dict[str, Any]:
    panels: list[Any] = []
    y, next_id = 0, 1
    for row_title, row_panels in PANELS:
        panels.append(G.RowPanel(title=row_title, gridPos=G.GridPos(h=1, w=24, x=0, y=y), id=next_id))
        next_id += 1
        y += 1
        for i, (title, unit, queries, description) in enumerate(row_panels):
            x = (i % 3) * 8
            if i and i % 3 == 0:
                y += 8
            targets = [G.Target(expr=expr, legendFormat=legend, refId=chr(ord("A") + n), datasource=DS)
                       for n, (expr, legend) in enumerate(queries)]
            panels.append(G.TimeSeries(title=title, dataSource=DS, targets=targets, unit=unit,
                                       description=description, id=next_id,
                                       gridPos=G.GridPos(h=8, w=8, x=x, y=y)))
            next_id += 1
        y += 8
    dash = G.Dashboard(
        title="libvirt-operator", uid="libvirt-operator", panels=panels, tags=["libvirt-operator", "kubernetes"],
        timezone="browser", refresh="30s", time=G.Time("now-1h", "now"),
        description="Reconciles, work queues, libvirt hosts, VMs, ISO imports and the operator process. Generated by hack/monitoring/generate.py.",
        templating=G.Templating(list=[G.Template(
            name="datasource", label="Data source", query="prometheus", type="datasource", default="Prometheus")]),
    ).auto_panel_ids()
    return json.loads(json.dumps(dash.to_json_data(), cls=DashboardEncoder))


# --------------------------------------------------------------------------------------------
# Alerts
# --------------------------------------------------------------------------------------------

# (alert, expr, for, severity, runbook under rag/, summary, description)
ALERTS = [
    ("LibvirtOperatorDown", f"up{{{JOB}}} == 0 or absent(up{{{JOB}}})", "5m", "critical",
     "guides/operator-alerts.md#operator-down", "The libvirt operator is down or not scraped",
     "Prometheus has not scraped the operator's /metrics for 5 minutes: VMs, ISOImages and hosts are not reconciled."),
    ("LibvirtHostUnreachable", "max by (host) (libvirt_operator_host_ready) == 0", "10m", "warning",
     "runbooks/host-unreachable.md", "LibvirtHost {{ $labels.host }} is not Ready",
     "The operator's probes of LibvirtHost {{ $labels.host }} have failed for 10 minutes (kubectl describe lvh {{ $labels.host }} shows the error code)."),
    ("LibvirtVMCrashLooping", 'sum(libvirt_operator_virtual_machines{status="CrashLoopBackOff"}) > 0', "10m", "warning",
     "runbooks/domain-crashed.md", "{{ $value }} VirtualMachine(s) in CrashLoopBackOff",
     "Domains keep crashing and the operator is backing off their restarts (kubectl get lvvm -A shows which)."),
    ("LibvirtOperatorReconcileErrors", "sum by (controller) (rate(controller_runtime_reconcile_errors_total[5m])) > 0", "15m", "warning",
     "guides/operator-alerts.md#reconcile-errors", "Reconcile errors in the {{ $labels.controller }} controller",
     "Reconciles of {{ $labels.controller }} have ended in errors for 15 minutes; libvirt_operator_errors_total says which error codes."),
    ("LibvirtOperatorWorkQueueGrowing", "workqueue_depth > 10 and deriv(workqueue_depth[10m]) > 0", "15m", "warning",
     "guides/operator-alerts.md#work-queue-growing", "Work queue {{ $labels.name }} keeps growing",
     "{{ $value }} keys are due in work queue {{ $labels.name }} and the depth has grown for 15 minutes: the operator does not keep up."),
    ("LibvirtOperatorKnowledgeBaseDegraded", "min(libvirt_operator_knowledge_base_healthy) == 0", "15m", "info",
     "runbooks/database-error.md", "Runbook knowledge base degraded",
     "Remediation links fall back to fixed per-code links (DATABASE_ERROR in /healthz); reconciles are not affected."),
    ("LibvirtISOImportStalled", 'sum(libvirt_operator_resource_conditions{kind="ISOImage",condition="Stalled",status="True"}) > 0', "15m", "warning",
     "runbooks/iso-download-failed.md", "{{ $value }} ISOImage(s) stalled",
     "ISO imports failed permanently or kept failing (kubectl get iso -A; the status error code names the runbook)."),
]


def rule_groups(runbook_base: str, for_override: str | None = None) -> dict[str, Any]:
    rules = []
    for name, expr, for_, severity, runbook, summary, description in ALERTS:
        rules.append({
            "alert": name, "expr": expr, "for": for_override or for_,
            "labels": {"severity": severity},
            "annotations": {"summary": summary, "description": description,
                            "runbook_url": f"{runbook_base}/{runbook}"},
        })
    return {"groups": [{"name": "libvirt-operator", "rules": rules}]}


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

HEADER = "# Generated by hack/monitoring/generate.py: edit that, then run `make monitoring`.\n"
LABELS = {"app.kubernetes.io/name": "libvirt-operator", "app.kubernetes.io/instance": "libvirt-operator"}


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None  # scripts and JSON stay readable
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _yaml(*docs: Any) -> str:
    return HEADER + "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=200) for d in docs)


def outputs() -> dict[Path, str]:
    dash = json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"
    return {
        CHART_FILES / "dashboard.json": dash,
        CHART_FILES / "alerts.yaml": _yaml(rule_groups(RUNBOOK_PLACEHOLDER)),
        MANIFESTS / "prometheus-rules.yaml": _yaml(rule_groups(DEFAULT_RUNBOOK_BASE)),
        MANIFESTS / "prometheusrule.yaml": _yaml({
            "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "libvirt-operator", "namespace": "libvirt-operator", "labels": LABELS},
            "spec": rule_groups(DEFAULT_RUNBOOK_BASE)}),
        MANIFESTS / "servicemonitor.yaml": _yaml({
            "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": {"name": "libvirt-operator", "namespace": "libvirt-operator", "labels": LABELS},
            "spec": {"selector": {"matchLabels": {"app.kubernetes.io/name": "libvirt-operator"}},
                     "namespaceSelector": {"matchNames": ["libvirt-operator"]},
                     "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "30s"}]}}),
        MANIFESTS / "grafana-dashboard-configmap.yaml": _yaml({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "libvirt-operator-dashboard", "namespace": "libvirt-operator",
                         "labels": {**LABELS, "grafana_dashboard": "1"}},
            "data": {"libvirt-operator.json": dash}}),
        # Merge into Argo CD's argocd-cm (kubectl -n argocd patch cm argocd-cm --patch-file …).
        ARGOCD / "argocd-cm-patch.yaml": _yaml(argocd_cm()),
    }


ARGOCD = REPO / "manifests" / "argocd"
GROUP = "virt.libvirt-operator.io"


ARGOCD_KINDS = ("VirtualMachine", "ISOImage", "LibvirtHost", "VirtualMachineSnapshot", "VirtualMachineRestore",
                "VirtualMachineMigration")


def argocd_cm() -> dict[str, Any]:
    """The argocd-cm keys that install manifests/argocd/health.lua for every kind."""
    script = (ARGOCD / "health.lua").read_text()
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "argocd-cm", "namespace": "argocd",
                         "labels": {"app.kubernetes.io/name": "argocd-cm", "app.kubernetes.io/part-of": "argocd"}},
            "data": {f"resource.customizations.health.{GROUP}_{kind}": script
                     for kind in ARGOCD_KINDS}}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path, text in outputs().items():
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(REPO)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("out of date (run `make monitoring`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Prometheus metrics. Reconcile metrics use controller-runtime's names and buckets so existing
operator dashboards work unchanged."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# controller-runtime's reconcile_time_seconds buckets (pkg/internal/controller/metrics).
_RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6,
                      0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5, 6, 7, 8, 9,
                      10, 15, 20, 25, 30, 40, 50, 60)

RECONCILE_TIME = Histogram(
    "controller_runtime_reconcile_time_seconds", "Length of time per reconciliation per controller",
    ["controller"], buckets=_RECONCILE_BUCKETS)
RECONCILE_TOTAL = Counter(
    "controller_runtime_reconcile_total", "Total number of reconciliations per controller",
    ["controller", "result"])
RECONCILE_ERRORS = Counter(
    "controller_runtime_reconcile_errors_total", "Total number of reconciliation errors per controller",
    ["controller"])

LIBVIRT_CALL_SECONDS = Histogram(
    "libvirt_operator_libvirt_call_duration_seconds", "Duration of blocking libvirt calls",
    ["host", "operation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
LIBVIRT_CALLS = Counter(
    "libvirt_operator_libvirt_calls_total", "libvirt calls by host, operation and outcome",
    ["host", "operation", "outcome"])
HOST_CONNECTED = Gauge(
    "libvirt_operator_host_connected", "1 when the operator holds a live connection to the host", ["host"])

VM_OPERATIONS = Counter(
    "libvirt_operator_vm_operations_total", "VM lifecycle operations performed",
    ["operation"])  # create, delete, start, stop, redefine
ERRORS = Counter(
    "libvirt_operator_errors_total", "Errors reported in resource status, by code", ["kind", "code"])

KNOWLEDGE_BASE_HEALTHY = Gauge(
    "libvirt_operator_knowledge_base_healthy", "1 when remediation lookups are served by the knowledge base")

ISO_BYTES = Counter("libvirt_operator_iso_bytes_total", "ISO bytes moved", ["direction"])  # downloaded/uploaded
ISO_IMPORT_SECONDS = Histogram(
    "libvirt_operator_iso_import_duration_seconds", "Duration of ISO imports (download + uploads)",
    buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))
ISO_FAILURES = Counter("libvirt_operator_iso_import_failures_total", "Failed ISO imports", ["reason"])
ISO_DOWNLOAD_SECONDS = Histogram(
    "libvirt_operator_iso_download_duration_seconds", "Duration of successful ISO downloads",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))
ISO_UPLOAD_SECONDS = Histogram(
    "libvirt_operator_iso_upload_duration_seconds", "Duration of successful ISO uploads to one host",
    ["host"], buckets=(0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))

VM_RESYNC_SECONDS = Histogram(
    "libvirt_operator_vm_resync_duration_seconds",
    "Duration of a host's VM resync (one bulk libvirt call + status refreshes)", ["host"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
DOMAIN_EVENTS = Counter(
    "libvirt_operator_domain_events_total", "libvirt domain lifecycle events received", ["host"])
ORPHANED_DOMAINS = Gauge(
    "libvirt_operator_orphaned_domains", "Domains created by the operator whose VirtualMachine is gone", ["host"])

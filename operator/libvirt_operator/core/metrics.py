"""Prometheus metrics. Reconcile, work-queue and Kubernetes client metrics use controller-runtime's
(client-go's) names, labels and buckets so existing operator dashboards and alerts work unchanged;
our own metrics are prefixed `libvirt_operator_`. Every metric is listed in docs/metrics.md.

Semantics (controller-runtime's): one reconcile = one handler run that did work (a timer tick that
found nothing due is not one); `result` is "success", "error" (it ended in an error, whatever kopf
calls it: TemporaryError and PermanentError included, and a VM whose status now reports an error),
"requeue_after" (no error, retried later) or "requeue"; every "error" also counts in
`controller_runtime_reconcile_errors_total`. Series labelled by a host disappear with the host
(`forget_host`).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from .errors import ErrorCode

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
ACTIVE_WORKERS = Gauge(
    "controller_runtime_active_workers", "Number of currently used workers per controller", ["controller"])

# client-go's workqueue metrics (k8s.io/client-go/util/workqueue, as controller-runtime registers
# them): label `name` is the queue. Depth and the two in-flight gauges are computed at scrape time
# (core.workqueue).
_QUEUE_BUCKETS = tuple(10.0 ** e for e in range(-8, 2))  # 1e-8 … 10 s, client-go's ExponentialBuckets(1e-8, 10, 10)
WORKQUEUE_ADDS = Counter("workqueue_adds_total", "Total number of adds handled by workqueue", ["name"])
WORKQUEUE_RETRIES = Counter("workqueue_retries_total", "Total number of retries handled by workqueue", ["name"])
WORKQUEUE_QUEUE_SECONDS = Histogram(
    "workqueue_queue_duration_seconds", "How long in seconds an item stays in workqueue before being requested",
    ["name"], buckets=_QUEUE_BUCKETS)
WORKQUEUE_WORK_SECONDS = Histogram(
    "workqueue_work_duration_seconds", "How long in seconds processing an item from workqueue takes",
    ["name"], buckets=_QUEUE_BUCKETS)

# client-go's REST client metrics (k8s.io/client-go/tools/metrics): the operator's own Kubernetes
# API calls (adapters.kube). `verb`/`method` is the HTTP method, `code` the status ("<error>" when
# no response came).
REST_CLIENT_SECONDS = Histogram(
    "rest_client_request_duration_seconds", "Request latency in seconds. Broken down by verb, and host.",
    ["verb", "host"], buckets=(0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0))
REST_CLIENT_REQUESTS = Counter(
    "rest_client_requests_total", "Number of HTTP requests, partitioned by status code, method, and host.",
    ["code", "method", "host"])

LIBVIRT_CALL_SECONDS = Histogram(
    "libvirt_operator_libvirt_call_duration_seconds", "Duration of blocking libvirt calls",
    ["host", "operation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
LIBVIRT_CALLS = Counter(
    "libvirt_operator_libvirt_calls_total", "libvirt calls by host, operation and outcome",
    ["host", "operation", "outcome"])
LIBVIRT_CALLS_IN_FLIGHT = Gauge(
    "libvirt_operator_libvirt_calls_in_flight",
    "libvirt calls currently executing on a host (not waiting for a slot), by operation",
    ["host", "operation"])
HOST_READY = Gauge(
    "libvirt_operator_host_ready", "1 when the LibvirtHost's last probe left it Ready, 0 when not", ["host"])
HOST_CONNECTED = Gauge(
    "libvirt_operator_host_connected", "1 when the operator holds a live connection to the host", ["host"])

MIGRATIONS = Counter(
    "libvirt_operator_vm_migrations_total", "VirtualMachineMigrations that ended, by outcome", ["outcome"])
MIGRATION_SECONDS = Histogram(
    "libvirt_operator_vm_migration_duration_seconds", "Live migrations from start to the switch (or the failure)",
    ["outcome"], buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))
VM_OPERATIONS = Counter(
    "libvirt_operator_vm_operations_total", "VM lifecycle operations performed",
    ["operation"])  # VM_OPERATION_NAMES
ERRORS = Counter(
    "libvirt_operator_errors_total", "Errors reported in resource status, by code", ["kind", "code"])

KNOWLEDGE_BASE_HEALTHY = Gauge(
    "libvirt_operator_knowledge_base_healthy", "1 when remediation lookups are served by the knowledge base")
KNOWLEDGE_BASE_LOOKUP_SECONDS = Histogram(
    "libvirt_operator_knowledge_base_lookup_duration_seconds",
    "Duration of knowledge-base runbook lookups (embedding + hybrid search; cache hits and fallbacks excluded)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

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


POOL_COMMITMENT_RATIO = Gauge(
    "libvirt_operator_storage_pool_commitment_ratio",
    "Virtual size of a pool's volumes over its capacity, measured when the operator creates a volume there "
    "(above 1: thin volumes overcommit the pool)", ["host", "pool"])

SNAPSHOT_OPERATION_SECONDS = Histogram(
    "libvirt_operator_snapshot_operation_duration_seconds",
    "Duration of VM snapshot operations on the host (create, restore, delete), whatever their outcome",
    ["operation"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
SNAPSHOT_OPERATIONS = Counter(
    "libvirt_operator_snapshot_operations_total",
    "VM snapshot operations by outcome: succeeded, failed (an error) or refused (unsupported disk, running VM)",
    ["operation", "outcome"])


# Metrics with a `host` label: their series go when the LibvirtHost goes.
_PER_HOST = (LIBVIRT_CALL_SECONDS, LIBVIRT_CALLS, LIBVIRT_CALLS_IN_FLIGHT, HOST_CONNECTED, HOST_READY, ISO_UPLOAD_SECONDS,
             VM_RESYNC_SECONDS, DOMAIN_EVENTS, ORPHANED_DOMAINS, POOL_COMMITMENT_RATIO)


def forget_host(host: str) -> None:
    """Remove every series of a deleted LibvirtHost (a dashboard must not show its last values forever)."""
    for metric in _PER_HOST:
        metric.remove_by_labels({"host": host})


RECONCILE_RESULTS = ("success", "error", "requeue_after", "requeue")
VM_OPERATION_NAMES = ("create", "redefine", "create_volume", "start", "stop", "pause", "unpause", "delete",
                      "recreate", "fence")  # recreate: left an out-of-service host; fence: its stale copy removed
ERROR_KINDS = ("VirtualMachine", "ISOImage", "LibvirtHost")


def initialise_series(controllers: tuple[str, ...] = ()) -> None:
    """Create the known label sets at 0 (as controller-runtime does for its results), so that the
    first error after start is a step in `rate()`/`increase()` and not a series that appears already
    at 1, which those functions cannot see move."""
    for controller in controllers:
        for result in RECONCILE_RESULTS:
            RECONCILE_TOTAL.labels(controller, result)
        RECONCILE_ERRORS.labels(controller)
        ACTIVE_WORKERS.labels(controller)
    for operation in VM_OPERATION_NAMES:
        VM_OPERATIONS.labels(operation)
    for outcome in ("succeeded", "failed", "refused"):
        MIGRATIONS.labels(outcome)
    for kind in ERROR_KINDS:
        for code in ErrorCode:
            ERRORS.labels(kind, code.value)
    for direction in ("downloaded", "uploaded"):
        ISO_BYTES.labels(direction)

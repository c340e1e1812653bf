"""Scrape-time gauges over the operator's watch caches (handlers.vm_state keeps the three kinds): how many
VirtualMachines are in each printable status, and how many objects of each kind have each condition
status. Counted at scrape time from memory (no per-object series, so nothing to remove when an
object goes), for the dashboard and the crash-loop / stalled-import alerts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

from .startup import RUNTIME_KEY, current_memo

KINDS = (("LibvirtHost", "hosts"), ("VirtualMachine", "vms"), ("ISOImage", "isos"))
# Always exported (0 when none), so a dashboard or alert query on one returns data.
VM_STATUSES = ("Provisioning", "WaitingForMedia", "Running", "Paused", "Stopping", "Stopped", "CrashLoopBackOff",
               "Terminating", "ErrorUnschedulable", "Unknown")


def _objects(state: Any, attr: str) -> Iterable[dict[str, Any]]:
    return list((getattr(state, attr, None) or {}).values())


class CacheCollector(Collector):
    def collect(self) -> Iterator[Any]:
        memo = current_memo()
        rt = memo.get(RUNTIME_KEY) if memo is not None else None
        state = rt.extras.get("vm") if rt is not None else None
        vms = GaugeMetricFamily("libvirt_operator_virtual_machines",
                                "VirtualMachines known to the operator, by status.printableStatus", labels=["status"])
        conds = GaugeMetricFamily("libvirt_operator_resource_conditions",
                                  "Objects of each kind by condition type and status", labels=["kind", "condition", "status"])
        if state is not None:
            by_status = Counter((vm.get("status") or {}).get("printableStatus") or "Unknown"
                                for vm in _objects(state, "vms"))
            for status in sorted(set(VM_STATUSES) | set(by_status)):
                vms.add_metric([status], by_status.get(status, 0))
            for kind, attr in KINDS:
                counts: Counter[tuple[str, str]] = Counter()
                for obj in _objects(state, attr):
                    for cond in (obj.get("status") or {}).get("conditions") or []:
                        counts[(str(cond.get("type")), str(cond.get("status")))] += 1
                for ctype in ("Ready", "Stalled"):
                    for cstatus in ("True", "False"):
                        counts.setdefault((ctype, cstatus), 0)
                for (ctype, cstatus), n in sorted(counts.items()):
                    conds.add_metric([kind, ctype, cstatus], n)
        yield vms
        yield conds

    def describe(self) -> Iterator[Any]:
        return iter(())


_COLLECTOR = CacheCollector()
REGISTRY.register(_COLLECTOR)

"""Pure: a LibvirtHost as placement sees it (HostView, parsed once from the object) and whether a
VM's hostRef / hostSelector names it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Mapping
from typing import Any

from ..core.api.host import LabelSelector, LabelSelectorRequirement
from ..core.api.vm import VirtualMachineSpec
from ..core.labels import labels_match
from ..core.quantity import parse_quantity
from ..core.timestamps import parse_time


@dataclasses.dataclass(frozen=True)
class HostView:
    """What placement needs to know about a LibvirtHost."""

    name: str
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ready: bool = False
    cpus: int = 0
    memory_bytes: int = 0
    allocated_cpus: int = 0
    allocated_memory_bytes: int = 0
    domain_types: tuple[str, ...] = ()
    default_pool: str = "default"
    deleting: bool = False
    last_probe_time: dt.datetime | None = None  # when `allocated` was measured
    # Tenancy (LibvirtHost spec): None = unrestricted.
    allowed_namespaces: frozenset[str] | None = None
    namespace_selector: LabelSelector | None = None
    allowed_pools: frozenset[str] | None = None
    allowed_networks: frozenset[str] | None = None
    allowed_bridges: frozenset[str] | None = None
    cpu_allocation_ratio: float = 4.0      # LibvirtHost spec (overcommit)
    memory_allocation_ratio: float = 1.0
    unschedulable: bool = False            # cordoned: nothing new is placed here
    out_of_service: bool = False           # fenced: nothing new is placed here; Recreate VMs leave
    shared_pools: frozenset[str] = frozenset()

    @property
    def schedulable(self) -> bool:
        return self.ready and not (self.deleting or self.unschedulable or self.out_of_service)

    @property
    def allocatable_cpus(self) -> int:
        """What placement may promise: capacity × allocation ratio."""
        return math.floor(self.cpus * self.cpu_allocation_ratio)

    @property
    def allocatable_memory_bytes(self) -> int:
        return math.floor(self.memory_bytes * self.memory_allocation_ratio)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> HostView:
        """Parse a LibvirtHost object (as the API returns it)."""
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in status.get("conditions") or [])
        capacity = status.get("capacity") or {}
        allocated = status.get("allocated") or {}
        return cls(
            name=meta.get("name", ""),
            labels=dict(meta.get("labels") or {}),
            ready=ready,
            cpus=int(capacity.get("cpus") or 0),
            memory_bytes=_bytes(capacity.get("memory")),
            allocated_cpus=int(allocated.get("cpus") or 0),
            allocated_memory_bytes=_bytes(allocated.get("memory")),
            domain_types=tuple(status.get("domainTypes") or ()),
            default_pool=spec.get("defaultPool") or "default",
            deleting=bool(meta.get("deletionTimestamp")),
            last_probe_time=parse_time(status.get("lastProbeTime")),
            allowed_namespaces=_name_set(spec.get("allowedNamespaces")),
            namespace_selector=_selector(spec.get("namespaceSelector")),
            allowed_pools=_name_set(spec.get("allowedPools")),
            allowed_networks=_name_set(spec.get("allowedNetworks")),
            allowed_bridges=_name_set(spec.get("allowedBridges")),
            cpu_allocation_ratio=_ratio(spec.get("cpuAllocationRatio"), 4.0),
            memory_allocation_ratio=_ratio(spec.get("memoryAllocationRatio"), 1.0),
            unschedulable=bool(spec.get("unschedulable")),
            out_of_service=bool(spec.get("outOfService")),
            shared_pools=_name_set(spec.get("sharedPools")) or frozenset(),
        )

    @property
    def restricts_namespaces(self) -> bool:
        return self.allowed_namespaces is not None or self.namespace_selector is not None


def _ratio(value: Any, default: float) -> float:
    try:
        ratio = float(value) if value is not None else default
    except (TypeError, ValueError):
        return default
    return ratio if ratio > 0 else default


def _name_set(value: Any) -> frozenset[str] | None:
    return None if value is None else frozenset(str(v) for v in value)


def _selector(value: Any) -> LabelSelector | None:
    if value is None:
        return None
    try:
        return LabelSelector.model_validate(value)
    except ValueError:
        # The CRD schema validates selectors; one it let through but we cannot read matches nothing.
        return _MATCH_NOTHING


_MATCH_NOTHING = LabelSelector(match_expressions=[LabelSelectorRequirement(key="-", operator="In", values=[])])


def _bytes(value: Any) -> int:
    if value in (None, ""):
        return 0
    try:
        return parse_quantity(value)
    except ValueError:
        return 0


def matches_selector(host: HostView, spec: VirtualMachineSpec) -> bool:
    if spec.host_ref is not None:
        return host.name == spec.host_ref
    return labels_match(spec.host_selector.match_labels if spec.host_selector else None, host.labels)

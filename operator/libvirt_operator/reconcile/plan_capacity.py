"""Pure: what VMs hold on a host (reservations of placed VMs and of placement decisions not yet in
status) and what is left free, after the host's allocation ratios."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

from ..core.api.vm import VirtualMachineSpec
from ..core.quantity import parse_quantity
from ..core.timestamps import parse_time
from .plan_hosts import HostView, matches_selector


@dataclasses.dataclass(frozen=True)
class Reservation:
    """Resources promised to a VM placed on a host that the host's `allocated` may not include yet:
    not running, or started after the host was last probed (`started`)."""

    host: str
    cpus: int
    memory_bytes: int
    uid: str = ""
    started: dt.datetime | None = None  # None: not running


def vm_resources(spec: VirtualMachineSpec) -> tuple[int, int]:
    return spec.cpu, parse_quantity(spec.memory)


# Placed VMs that are not about to run: they hold no reservation (their domain, if any, is not
# running, and the host's `allocated` counts whatever does run).
NOT_RUNNING_SOON = frozenset({"Stopped", "WaitingForMedia", "ErrorUnschedulable", "CrashLoopBackOff", "Unknown",
                              "Terminating"})


def reservation_of(vm: Mapping[str, Any]) -> Reservation | None:
    """The reservation one VirtualMachine object holds, or None: not placed (status.host), being
    deleted, stopped on purpose (Halted, or a finished run), or not able to run now (waiting for
    media, crash-looping, blocked by an error): only what should be running is counted, so VMs that
    never start cannot eat a host's capacity forever. A running VM carries its start time so
    `free_resources` counts it only until a host probe has seen it."""
    meta = vm.get("metadata") or {}
    status = vm.get("status") or {}
    spec = vm.get("spec") or {}
    if meta.get("deletionTimestamp") or not status.get("host"):
        return None
    printable = status.get("printableStatus")
    if spec.get("runStrategy") == "Halted" or printable in NOT_RUNNING_SOON:
        return None
    if status.get("error") and printable not in ("Running", "Paused", "Stopping"):
        return None  # provisioning failed (a pool, the host, the spec): it waits, it does not run
    running = printable in ("Running", "Paused", "Stopping")
    started = parse_time(status.get("lastStartTime") or status.get("firstBootTime")) if running else None
    if running and started is None:
        return None
    try:
        memory = parse_quantity(spec.get("memory") or "512Mi")
    except ValueError:
        return None
    return Reservation(status["host"], int(spec.get("cpu") or 1), memory, meta.get("uid", ""), started)


def placement_reservation(spec: VirtualMachineSpec, host: str, uid: str) -> Reservation | None:
    """What a placement decision reserves on its host until the VM's status shows it placed: the
    VM's resources, not running yet. None for a Halted VM (it will not run)."""
    if spec.run_strategy == "Halted":
        return None
    cpus, memory = vm_resources(spec)
    return Reservation(host, cpus, memory, uid, None)


def reservations(vms: Iterable[Mapping[str, Any]], exclude_uid: str | None = None) -> list[Reservation]:
    """Reservations from VirtualMachine objects (see `reservation_of`). O(all VMs): the operator
    keeps them indexed by host instead (handlers.vm_state); this is the stateless fallback."""
    result = []
    for vm in vms:
        if (vm.get("metadata") or {}).get("uid") == exclude_uid:
            continue
        r = reservation_of(vm)
        if r is not None:
            result.append(r)
    return result


def capacity_hosts(spec: VirtualMachineSpec, hosts: Iterable[HostView]) -> list[str]:
    """Hosts whose reservations a placement of this VM reads: the Ready, matching ones. Empty for
    a hostRef pin: its capacity is not checked, so it needs no reservations at all."""
    if spec.host_ref is not None:
        return []
    return [h.name for h in hosts if h.ready and not h.deleting and matches_selector(h, spec)]


def free_resources(host: HostView, reserved: Iterable[Reservation]) -> tuple[int, int]:
    """free = capacity × allocation ratio − allocated (running domains at the last probe) −
    reservations (placed VMs about to run, or started after that probe). Negative when pinned VMs
    overcommit the host; messages show at least 0."""
    cpus = host.allocatable_cpus - host.allocated_cpus
    memory = host.allocatable_memory_bytes - host.allocated_memory_bytes
    for r in reserved:
        if r.host != host.name:
            continue
        if r.started is not None and host.last_probe_time is not None and r.started < host.last_probe_time:
            continue  # already in `allocated`
        cpus -= r.cpus
        memory -= r.memory_bytes
    return cpus, memory

"""Pure placement: the host a VM goes to (hostRef, or the hostSelector's Ready host with the most free
capacity that admits it), or the error that says why none."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping

from ..core.api.vm import VirtualMachineSpec
from ..core.errors import AppError, ErrorCode
from ..core.labels import selector_text
from .plan_hosts import HostView, matches_selector
from .plan_capacity import Reservation, free_resources, vm_resources
from .plan_tenancy import host_denial


@dataclasses.dataclass(frozen=True)
class Placement:
    host: str | None
    error: AppError | None = None
    free_cpus: int | None = None
    free_memory_bytes: int | None = None


def choose_host(spec: VirtualMachineSpec, hosts: Iterable[HostView],
                reserved: Iterable[Reservation] = (), namespace: str = "",
                namespace_labels: Mapping[str, str] | None = None, *,
                avoid: Collection[str] = (), shared_pools: Collection[str] = ()) -> Placement:
    """Pick a Ready host matching hostSelector with room for the VM; most free memory wins
    (then most free CPUs, then name, so the choice is deterministic). No fit → a Placement whose
    error is HOST_NOT_FOUND (hostRef names no host), NO_SCHEDULABLE_HOST (no Ready host matches) or
    INSUFFICIENT_RESOURCES (matching hosts are full). hostRef pins: the host must exist and be Ready,
    capacity is not checked. Cordoned (unschedulable) and out-of-service hosts take nothing new.
    A VM leaving a failed host (reconcile.plan_failover) passes `avoid` (the hosts that may still hold a
    copy of it) and `shared_pools` (the pools its disks live in: the new host must share them all)."""
    hosts = list(hosts)
    by_host: dict[str, list[Reservation]] = {}
    for r in reserved:  # grouped once: O(reservations + hosts), not O(reservations × hosts)
        by_host.setdefault(r.host, []).append(r)
    cpus, memory = vm_resources(spec)
    if spec.host_ref is not None and not any(h.name == spec.host_ref for h in hosts):
        return Placement(None, AppError(ErrorCode.HOST_NOT_FOUND,
                                        f"LibvirtHost {spec.host_ref} named by hostRef does not exist",
                                        {"host": spec.host_ref}))
    matching = [h for h in hosts if matches_selector(h, spec)]
    # Tenancy before readiness: a host that refuses the VM is no candidate, Ready or not.
    denials = {h.name: host_denial(spec, h, namespace, namespace_labels) for h in matching}
    if matching and all(d is not None for d in denials.values()):
        if spec.host_ref is not None:
            return Placement(None, denials[spec.host_ref])
        first = min((d for d in denials.values() if d is not None),
                    key=lambda d: _TENANCY_ORDER.index(d.code))
        names = sorted(denials)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return Placement(None, AppError(
            first.code, f"none of the {len(names)} LibvirtHost(s) {_placement_scope(spec)} admits this VM "
                        f"({shown}); e.g. {first.message}",
            {**first.context, "matchingHosts": len(names)}))
    matching = [h for h in matching if denials[h.name] is None]
    candidates = [h for h in matching if h.schedulable and h.name not in avoid
                  and h.shared_pools.issuperset(shared_pools)]
    if not candidates:
        closed = sorted(h.name for h in matching if h.ready and (h.unschedulable or h.out_of_service))
        if spec.host_ref is not None and spec.host_ref in closed:
            what = (f"LibvirtHost {spec.host_ref} is cordoned (spec.unschedulable) or out of service "
                    "(spec.outOfService): nothing new is placed there")
        elif shared_pools:
            what = (f"no other Ready, schedulable LibvirtHost {_placement_scope(spec)} lists all of the VM's "
                    f"disk pools in spec.sharedPools ({', '.join(sorted(shared_pools))})")
        elif spec.host_ref is not None:
            what = f"LibvirtHost {spec.host_ref} is not Ready"
        elif spec.host_selector and spec.host_selector.match_labels:
            what = (f"no Ready LibvirtHost matches hostSelector {selector_text(spec.host_selector.match_labels)} "
                    f"({len(matching)} match, none Ready)")
        else:
            what = "no LibvirtHost is Ready"
        if closed and spec.host_ref is None and not shared_pools:
            what += f"; cordoned or out of service: {', '.join(closed[:5])}"
        return Placement(None, AppError(ErrorCode.NO_SCHEDULABLE_HOST, what,
                                        {"matchingHosts": len(matching)}))
    if spec.host_ref is not None:
        # An explicit pin (like a pod's nodeName) skips the capacity check: libvirt hosts are often
        # overcommitted on purpose, and the user chose this host.
        host = candidates[0]
        free_cpu, free_mem = free_resources(host, by_host.get(host.name, ()))
        return Placement(host.name, None, free_cpu, free_mem)
    fits: list[tuple[int, int, HostView]] = []
    best_free: tuple[int, int] | None = None
    for host in candidates:
        free_cpu, free_mem = free_resources(host, by_host.get(host.name, ()))
        if best_free is None or (free_mem, free_cpu) > best_free:
            best_free = (free_mem, free_cpu)
        if free_cpu >= cpus and free_mem >= memory:
            fits.append((free_mem, free_cpu, host))
    if not fits:
        assert best_free is not None
        return Placement(None, AppError(
            ErrorCode.INSUFFICIENT_RESOURCES,
            f"none of {len(candidates)} matching Ready hosts has {cpus} CPUs and {memory // 2**20} MiB free "
            f"(most free: {max(0, best_free[1])} CPUs, {max(0, best_free[0]) // 2**20} MiB, after the hosts' "
            "allocation ratios)",
            {"cpus": cpus, "memoryMiB": memory // 2**20, "candidates": len(candidates)}))
    fits.sort(key=lambda f: (-f[0], -f[1], f[2].name))
    free_mem, free_cpu, host = fits[0]
    return Placement(host.name, None, free_cpu, free_mem)


_TENANCY_ORDER = (ErrorCode.NAMESPACE_NOT_ALLOWED, ErrorCode.POOL_NOT_ALLOWED, ErrorCode.NETWORK_NOT_ALLOWED)


def _placement_scope(spec: VirtualMachineSpec) -> str:
    if spec.host_selector and spec.host_selector.match_labels:
        return "matching hostSelector " + selector_text(spec.host_selector.match_labels)
    return "in the cluster"

"""Pure: whether a VM leaves its out-of-service host (hostFailurePolicy), and what blocks it.

A host that does not answer may still run the guest (libvirtd down, QEMU up), so unreachability alone
never moves a VM: only the fence declaration (LibvirtHost spec.outOfService) does. A VM moves only
when all of its volume disks can follow, i.e. live in pools both hosts list in spec.sharedPools; the
shared-pool half of that is checked here for the failed host, and by choose_host for the new one."""

from __future__ import annotations

import dataclasses

from ..core.api.vm import VirtualMachineSpec
from .plan_hosts import HostView


@dataclasses.dataclass(frozen=True)
class Failover:
    move: bool
    message: str                                     # why it stays, or where it goes
    shared_pools: frozenset[str] = frozenset()       # the new host must list all of these


def disk_pools(spec: VirtualMachineSpec, default_pool: str) -> dict[str, str]:
    """Volume disk name → the pool its volume lives in."""
    return {d.name: d.volume.pool or default_pool for d in spec.disks if d.volume is not None}


def plan_failover(spec: VirtualMachineSpec, host: HostView) -> Failover | None:
    """None while the VM's host is in service; otherwise whether the VM leaves it, and why (not)."""
    if not host.out_of_service:
        return None
    if spec.host_failure_policy != "Recreate":
        return Failover(False, f"LibvirtHost {host.name} is out of service (spec.outOfService); hostFailurePolicy "
                               "Wait: the VM stays placed there until the host is back")
    if spec.host_ref is not None:
        return Failover(False, f"LibvirtHost {host.name} is out of service (spec.outOfService), but hostRef pins the "
                               "VM to it: it stays placed there until the host is back")
    pools = disk_pools(spec, host.default_pool)
    local = sorted(f"{disk} (pool {pool})" for disk, pool in pools.items() if pool not in host.shared_pools)
    if local:
        return Failover(False, f"LibvirtHost {host.name} is out of service, but the VM cannot be recreated elsewhere: "
                               f"disk {', disk '.join(local)} cannot follow it: the pool is not in that host's "
                               "spec.sharedPools, so its data would stay behind; the VM waits for the host")
    return Failover(True, f"LibvirtHost {host.name} is out of service: the VM is recreated on another host "
                          "(hostFailurePolicy Recreate)", frozenset(pools.values()))

"""Live migration of a VirtualMachine's domain to another host (the VirtualMachineMigration handler
drives it; the adapter is adapters.libvirt.migration), and the crash-safe hand-over of status.host.

Before the copy starts, status.migrationTargetHost names the target. The handler holds the VM's lock
for the whole move, so no reconcile or host round touches the domain meanwhile. It sets status.host to
the target once libvirt has switched. An operator killed in between finds the field set: `settle`
then asks both hosts where the domain is, before anything could define it again on the source."""

from __future__ import annotations

from typing import Any

from ..adapters.libvirt import domains
from ..core.errors import AppError, ErrorCode
from ..core.logs import get_logger
from . import plan
from .runtime import Runtime
from .vm_types import ClusterView

log = get_logger(__name__)
TARGET = "migrationTargetHost"


def settled_host(on_target: bool | None, on_source: bool | None) -> str:
    """Where an interrupted migration left the domain, from each host's answer (True: it has the domain,
    False: it has not, None: no answer): "target", "source", "both" (still copying) or "unknown"."""
    if on_target and on_source is False:
        return "target"
    if on_target is False:  # not on the target: where it was (or nowhere), whether the source answers or not
        return "source"
    if on_target and on_source:
        return "both"
    return "unknown"


async def settle(rt: Runtime, uid: str, status: dict[str, Any], view: ClusterView) -> None:
    """status.migrationTargetHost is set and nobody migrates (the operator restarted mid-move, or gave up
    waiting for libvirt): the domain's host is where libvirt has it. Decided only from answers: on the
    target alone → the target; on the source alone, or nowhere → the source. On both (the copy still
    runs) or when a host that could hold it does not answer, it raises and the VM waits: defining it on
    the source then could run it twice."""
    target, source = str(status.get(TARGET) or ""), str(status.get("host") or "")

    async def where(host: str) -> bool | None:
        conn = rt.pool.get(host) if host else None
        if conn is None or conn.closed:
            return None
        try:
            return await conn.call("get_domain", lambda c: domains.get_domain(c, uid)) is not None
        except AppError:
            return None

    on_target, on_source = await where(target), await where(source)
    decided = settled_host(on_target, on_source)
    if decided == "target":
        status["host"] = target
    elif decided == "source":
        pass  # rolled back (or never started): it stays on the source
    elif decided == "both":
        raise AppError(ErrorCode.LIBVIRT_TIMEOUT, f"a migration from {source} to {target} is still in progress; the "
                                                   "VM is left alone until libvirt finishes or rolls it back",
                       {"host": source, "target": target})
    else:
        raise AppError(ErrorCode.HOST_UNREACHABLE,
                       f"a migration from {source} to {target} was interrupted and "
                       f"{target if on_target is None else source} does not answer: nothing is done until it does",
                       {"host": target if on_target is None else source})
    log.info("interrupted migration settled", uid=uid, host=status.get("host"), target=target)
    status[TARGET] = None


def target_host(vm_spec: Any, source: str, requested: str | None, view: ClusterView, uid: str,
                namespace: str, avoid: set[str] | None = None) -> str:
    """The requested host (must be Ready, schedulable, not the source, admitting the VM, holding nothing of
    it still to clean up: `avoid`, the VM's staleDomainHosts) or a placement's choice among the others."""
    avoid = avoid or set()
    views = [plan.HostView.from_object(h) for h in view.hosts.values()]
    if requested:
        hv = next((v for v in views if v.name == requested), None)
        if hv is None:
            raise AppError(ErrorCode.MIGRATION_FAILED, f"target LibvirtHost {requested} does not exist")
        if requested == source:
            raise AppError(ErrorCode.MIGRATION_FAILED, f"the VM already runs on {requested}")
        if requested in avoid:
            raise AppError(ErrorCode.MIGRATION_FAILED, f"LibvirtHost {requested} still holds a copy of the VM to clean "
                                                       "up (status.staleDomainHosts): try again once it is gone")
        if not hv.schedulable:
            raise AppError(ErrorCode.MIGRATION_FAILED,
                           f"target LibvirtHost {requested} is not Ready, cordoned or out of service")
        denial = plan.host_denial(vm_spec, hv, namespace, None)
        if denial is not None:
            raise AppError(ErrorCode.MIGRATION_FAILED, f"target LibvirtHost {requested} refuses the VM: {denial.message}")
        return requested
    placement = plan.choose_host(vm_spec, views, view.reservations_for(plan.capacity_hosts(vm_spec, views), uid),
                                 namespace=namespace, avoid={source} | avoid)
    if placement.error is not None or placement.host is None:
        raise AppError(ErrorCode.MIGRATION_FAILED, f"no target host: {placement.error.message if placement.error else ''}")
    return placement.host

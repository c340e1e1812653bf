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


async def settle(rt: Runtime, uid: str, status: dict[str, Any], view: ClusterView) -> None:
    """status.migrationTargetHost is set and nobody migrates (the operator restarted mid-move): the
    domain's host is where libvirt has it. Raises while that cannot be told (the target does not
    answer and the source has no domain): defining it on the source could run it twice."""
    target, source = str(status.get(TARGET) or ""), str(status.get("host") or "")

    async def where(host: str) -> bool | None:
        conn = rt.pool.get(host)
        if conn is None or conn.closed:
            return None
        try:
            return await conn.call("get_domain", lambda c: domains.get_domain(c, uid)) is not None
        except AppError:
            return None

    on_target, on_source = await where(target), await where(source) if source else False
    if on_target:
        status["host"] = target
    elif on_target is None and not on_source:
        raise AppError(ErrorCode.HOST_UNREACHABLE,
                       f"a migration to LibvirtHost {target} was interrupted and {target} does not answer: the VM "
                       "may run there; nothing is done until it answers", {"host": target})
    log.info("interrupted migration settled", uid=uid, host=status.get("host"), target=target)
    status.pop(TARGET, None)
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

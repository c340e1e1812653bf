"""hostFailurePolicy: a VM leaving its out-of-service host (decision: reconcile.plan_failover), and the
removal of the copies it left behind on hosts that could not be reached then.

Order is what keeps one copy: the old copy is powered off and undefined first when its host answers;
when it does not, the host was declared fenced (its domains do not run) and is recorded in
status.staleDomainHosts in the same status write that records the new placement, so the copy is
removed the moment the host answers again, before anything else happens there."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..adapters.libvirt import domains
from ..core.errors import AppError, ErrorCode
from ..core.logs import get_logger
from ..core.metrics import VM_OPERATIONS
from ..core.api.vm import VirtualMachineSpec
from . import plan
from .runtime import Runtime
from .vm_types import ClusterView, Event

log = get_logger(__name__)
STALE_HOSTS = "staleDomainHosts"


@dataclasses.dataclass(frozen=True)
class Departure:
    """A VM about to leave its out-of-service host: where it must not go, the pools the new host must share."""

    host: str
    host_view: plan.HostView
    message: str
    avoid: frozenset[str]
    shared_pools: frozenset[str]


def stale_hosts(status: Mapping[str, Any]) -> set[str]:
    return {str(h) for h in status.get(STALE_HOSTS) or [] if h}


def departure(spec: VirtualMachineSpec, status: Mapping[str, Any], view: ClusterView) -> Departure | None:
    """For a VM placed on an out-of-service host, whether it leaves (nothing is changed yet: the copy there
    is removed only once a new host is chosen, `vacate`). None when it stays; a host that does not answer
    then raises HOST_OUT_OF_SERVICE, so the VM waits with the reason in its status."""
    host = str(status.get("host") or "")
    host_obj = view.hosts.get(host)
    if not host or host_obj is None:
        return None
    if not (host_obj.get("spec") or {}).get("outOfService"):
        return None  # in service (HostView.out_of_service): no need to parse the host for every VM refresh
    hv = plan.HostView.from_object(host_obj)
    decision = plan.plan_failover(spec, hv)
    if decision is None:
        return None
    if not decision.move:
        if hv.ready:
            return None  # it answers: the VM's domain is reported as it is (staying_refusal), never started
        raise AppError(ErrorCode.HOST_OUT_OF_SERVICE, decision.message, {"host": host})
    return Departure(host, hv, decision.message, frozenset(stale_hosts(status) | {host}), decision.shared_pools)


async def vacate(rt: Runtime, leaving: Departure, meta: Mapping[str, Any], status: dict[str, Any],
                 events: list[Event]) -> None:
    """A new host is chosen: the copy on the old one is powered off and undefined first when the old host
    answers; otherwise the host joins status.staleDomainHosts (written with the new placement) and the
    copy is removed as soon as it answers. status.host is cleared for the new placement."""
    uid = str(meta.get("uid") or "")
    stale = stale_hosts(status)
    removed = await _remove_copy(rt, leaving.host, leaving.host_view, uid) if leaving.host_view.ready else None
    if removed is None:
        stale.add(leaving.host)
        events.append(("Warning", "HostOutOfService",
                       f"{leaving.message}; LibvirtHost {leaving.host} does not answer: its copy of the domain is "
                       "removed as soon as it does (status.staleDomainHosts)"))
    else:
        events.append(("Warning", "HostOutOfService",
                       f"{leaving.message}; its domain on {leaving.host} was powered off and undefined first"
                       + (f" (local volumes deleted: {', '.join(removed)})" if removed else "")))
    VM_OPERATIONS.labels("recreate").inc()
    log.warning("VM leaves an out-of-service host", kind="VirtualMachine", namespace=meta.get("namespace"),
                name=meta.get("name"), uid=uid, host=leaving.host, stale=sorted(stale))
    status.pop("host", None)
    status[STALE_HOSTS] = sorted(stale) or None


def staying_refusal(spec: VirtualMachineSpec, hv: plan.HostView) -> AppError | None:
    """A VM that stays on its out-of-service host while the host answers: like a tenancy refusal, its domain
    is reported as it is and neither started, redefined nor stopped until the host is back in service."""
    decision = plan.plan_failover(spec, hv)
    if decision is None or decision.move:
        return None
    return AppError(ErrorCode.HOST_OUT_OF_SERVICE, decision.message, {"host": hv.name})


async def _remove_copy(rt: Runtime, host: str, hv: plan.HostView, uid: str) -> list[str] | None:
    """The VM's domain on a host that answers, powered off and undefined: the local volumes deleted, or
    None when the host could not be asked after all."""
    conn = rt.pool.get(host)
    if conn is None or conn.closed:
        return None
    try:
        _found, deleted = await conn.call("remove_stale_copy",
                                          lambda c: domains.remove_stale_copy(c, uid, hv.shared_pools))
    except AppError as err:
        log.info("could not remove the VM's copy on its out-of-service host; recorded as stale", uid=uid,
                 host=host, code=err.code.value)
        return None
    return deleted


async def remove_stale_copies(rt: Runtime, host: str, hv: plan.HostView, conn: Any, uids: list[str]
                              ) -> dict[str, tuple[bool, list[str]]]:
    """On a host that answers again: remove the copies of these VMs (each recorded it in status.staleDomainHosts).
    Returns uid → (a domain was there, local volumes deleted) for those removed; failures are logged
    and left for the next round."""
    done: dict[str, tuple[bool, list[str]]] = {}
    for uid in uids:
        try:
            done[uid] = await conn.call("remove_stale_copy",
                                        lambda c, u=uid: domains.remove_stale_copy(c, u, hv.shared_pools))
        except AppError as err:
            log.warning("could not remove a stale copy of a VM's domain; trying again next round", host=host,
                        uid=uid, code=err.code.value, error=err.message)
            continue
        if done[uid][0]:
            VM_OPERATIONS.labels("fence").inc()
    return done

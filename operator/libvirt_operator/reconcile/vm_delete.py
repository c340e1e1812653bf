"""VirtualMachine deletion: tear the domain and the VM's volumes down on its host (or, for a VM never
recorded on a host, on every host it could be on), or say what blocks the release."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pydantic

from ..adapters.libvirt import domains
from ..core.api.common import FORCE_RELEASE_ANNOTATION
from ..core.api.vm import VirtualMachineSpec
from ..core.conditions import set_condition, summarize
from ..core.errors import AppError, ErrorCode
from ..core.logs import get_logger
from ..core.metrics import VM_OPERATIONS
from . import plan
from .host import host_connection
from .failures import error_status, human_message
from .runtime import Runtime
from .vm_failover import remove_stale_copies, stale_hosts
from .vm_types import ClusterView, DeleteOutcome, Event

log = get_logger(__name__)


async def delete_vm(body: Mapping[str, Any], rt: Runtime, view: ClusterView) -> DeleteOutcome:
    """Destroy, undefine (NVRAM too) and delete the VM's volumes: those named with its uid and those
    its own domain (UUID = uid) uses under the earlier naming scheme; decided on the host, never from
    status.volumes or status.domainName (whoever can patch status must not choose what is deleted).
    A host that is gone or unreachable blocks release with a condition until it returns, or until the
    VM carries the annotation virt.libvirt-operator.io/force-release: "true" (then the finalizer is
    released and whatever is left on the host is abandoned)."""
    meta = body.get("metadata") or {}
    uid = meta.get("uid", "")
    generation = int(meta.get("generation") or 0)
    status = dict(body.get("status") or {})
    force = (meta.get("annotations") or {}).get(FORCE_RELEASE_ANNOTATION) == "true"
    host = status.get("host")
    if not host:
        return await _delete_unplaced(body, rt, view, status, generation, force)
    host_obj = view.hosts.get(host)
    host_view = plan.HostView.from_object(host_obj) if host_obj else None
    default_pool = host_view.default_pool if host_view else "default"
    shared = sorted(host_view.shared_pools) if host_view else None  # unknown host: refresh every pool
    # Where to look for volumes named with the VM's uid (the adapter adds its domain's disks' pools).
    # Pools from status only widen the search: a name without this uid is never deleted.
    pools = {default_pool}
    pools.update(str(v["pool"]) for v in status.get("volumes") or [] if isinstance(v, dict) and v.get("pool"))
    try:
        spec = VirtualMachineSpec.model_validate(body.get("spec") or {})
        pools.update(disk.volume.pool or default_pool for disk in spec.disks if disk.volume is not None)
    except pydantic.ValidationError:
        pass
    try:
        try:
            conn = await host_connection(rt, host, host_obj)
        except AppError as err:
            if err.code is not ErrorCode.HOST_NOT_FOUND:  # deleted, while its object is still seen
                raise
            conn = None
        if conn is None:
            raise AppError(ErrorCode.HOST_NOT_FOUND,
                           f"LibvirtHost {host} is gone: the domain and its volumes cannot be removed; set the "
                           f'annotation {FORCE_RELEASE_ANNOTATION}: "true" to release the VM anyway',
                           {"host": host})
        if not uid:
            raise AppError(ErrorCode.INVALID_SPEC, "the VirtualMachine has no uid", {"host": host})
        deleted = await conn.call("teardown", lambda c: domains.teardown(c, uid, sorted(pools), shared))
    except AppError as err:
        if force:
            return DeleteOutcome(True, None, [("Warning", "ForceReleased",
                                               f"released without cleaning up host {host}: {err.message}")], None)
        return await _deletion_blocked(err, status, generation, rt, [])
    VM_OPERATIONS.labels("delete").inc()
    events: list[Event] = [("Normal", "Deleted",
                            f"domain removed from {host}; volumes deleted: {', '.join(deleted) or 'none'}")]
    return DeleteOutcome(True, None, events + await _stale_copies_on_delete(rt, view, uid, status))


async def _stale_copies_on_delete(rt: Runtime, view: ClusterView, uid: str, status: Mapping[str, Any]) -> list[Event]:
    """Copies left on out-of-service hosts (status.staleDomainHosts): removed where the host answers; a host
    that does not never blocks the deletion (it was declared fenced: nothing runs there), and the copy it
    still holds is reported in its status.orphanedDomains once it answers."""
    events: list[Event] = []
    for host in sorted(stale_hosts(status)):
        host_obj = view.hosts.get(host)
        conn = rt.pool.get(host)
        hv = plan.HostView.from_object(host_obj) if host_obj is not None else None
        if hv is not None and hv.ready and conn is not None and not conn.closed:
            if (await remove_stale_copies(rt, host, hv, conn, [uid])).get(uid):
                events.append(("Normal", "StaleCopyRemoved", f"its stale domain on LibvirtHost {host} was removed"))
                continue
        events.append(("Warning", "StaleCopyLeft",
                       f"LibvirtHost {host} (out of service) could not be asked: the stale copy of the domain there "
                       "is reported in its status.orphanedDomains once it answers; remove it with virsh undefine"))
    return events


def _teardown_pools(body: Mapping[str, Any], default_pool: str) -> list[str]:
    pools = {default_pool}
    try:
        spec = VirtualMachineSpec.model_validate(body.get("spec") or {})
        pools.update(disk.volume.pool or default_pool for disk in spec.disks if disk.volume is not None)
    except pydantic.ValidationError:
        pass
    return sorted(pools)


async def _delete_unplaced(body: Mapping[str, Any], rt: Runtime, view: ClusterView, status: dict[str, Any],
                           generation: int, force: bool) -> DeleteOutcome:
    """A VM whose status names no host may still have a domain and volumes somewhere (placed by an
    older release that recorded the host after define, or a status wiped since): tear down by UUID
    and uid on every known host that can be asked. A Ready host the VM could be on (hostRef /
    hostSelector) that fails the teardown blocks the release, as for a placed VM; hosts that are not
    Ready are not searched (an unschedulable VM must stay deletable while its hosts are down), and
    a Warning Event names the ones the VM could be on."""
    meta = body.get("metadata") or {}
    uid = meta.get("uid", "")
    if not uid or not view.hosts:
        return DeleteOutcome(True, None, [])
    try:
        spec: VirtualMachineSpec | None = VirtualMachineSpec.model_validate(body.get("spec") or {})
    except pydantic.ValidationError:
        spec = None

    async def clean(name: str, host_obj: Mapping[str, Any]) -> tuple[str, bool, list[str] | None, AppError | None]:
        hv = plan.HostView.from_object(host_obj)
        could_be_there = spec is None or plan.matches_selector(hv, spec)
        conn = rt.pool.get(name)
        if conn is None and not hv.ready:
            return name, could_be_there, None, None
        pools = _teardown_pools(body, hv.default_pool)
        try:
            if conn is None:
                conn = await host_connection(rt, name, host_obj)
            shared = sorted(hv.shared_pools)
            return name, could_be_there, await conn.call("teardown", lambda c: domains.teardown(c, uid, pools, shared)), None
        except AppError as err:
            if not (could_be_there and hv.ready):
                log.info("host not searched for an unplaced VM's leftovers", host=name, uid=uid,
                         code=err.code.value)
                return name, could_be_there, None, None
            return name, True, None, err

    results = await asyncio.gather(*(clean(n, h) for n, h in sorted(view.hosts.items())))
    blocked = [(n, e) for n, _, _, e in results if e is not None]
    cleaned = {n: d for n, _, d, _ in results if d}
    unsearched = sorted(n for n, could, d, e in results if could and d is None and e is None)
    events: list[Event] = []
    if cleaned:
        VM_OPERATIONS.labels("delete").inc()
        events.append(("Normal", "Deleted", "; ".join(f"removed from {n}: volumes {', '.join(d)}"
                                                      for n, d in sorted(cleaned.items()))))
    if not blocked:
        if unsearched:
            events.append(("Warning", "NotSearched",
                           f"the VM was never recorded on a host; LibvirtHost(s) it could be on were not Ready and "
                           f"not searched for a domain or volumes of UUID {uid}: {', '.join(unsearched[:10])}"))
        return DeleteOutcome(True, None, events)
    name, err = blocked[0]
    if force:
        return DeleteOutcome(True, None, events + [("Warning", "ForceReleased",
                                                    f"released without searching host {name}: {err.message}")])
    err = AppError(err.code, f"the VM was never recorded on a host, so every host it could be on is searched "
                             f"for its domain and volumes; {err.message}. Set the annotation "
                             f'{FORCE_RELEASE_ANNOTATION}: "true" to release it anyway', err.context)
    return await _deletion_blocked(err, status, generation, rt, events)


async def _deletion_blocked(err: AppError, status: dict[str, Any], generation: int, rt: Runtime,
                            events: list[Event]) -> DeleteOutcome:
    """The VM stays (Terminating, DeletionBlocked) until the work queue's next attempt succeeds."""
    err_status = await error_status(err, status.get("error"), "VirtualMachine", rt.remediator)
    message = human_message(err, err_status)
    conditions = summarize(status.get("conditions") or [], ready=False, reason=err.reason, message=message,
                           generation=generation, reconciling=True, stalled=err.code is ErrorCode.HOST_NOT_FOUND)
    conditions = set_condition(conditions, "DeletionBlocked", True, err.reason, message, generation)
    new = {**status, "conditions": conditions, "error": err_status, "printableStatus": "Terminating"}
    if (status.get("error") or {}).get("code") != err.code.value:
        events = events + [("Warning", "DeletionBlocked", message)]
    return DeleteOutcome(False, new, events, err)

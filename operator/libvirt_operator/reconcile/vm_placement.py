"""Placement bookkeeping around reconcile.plan.choose_host: recording a placement in the VM's status
before anything exists on the host, and finding a domain of the VM's UUID already on a host."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from ..adapters.kube import ConflictError
from ..adapters.libvirt import domains
from ..core.domain import DomainObservation
from ..core.errors import AppError, ErrorCode
from ..core.api.vm import VirtualMachineSpec
from ..core.conditions import set_condition
from ..core.logs import get_logger
from . import plan
from .host import host_connection
from .runtime import Runtime
from .vm_failover import STALE_HOSTS, Departure, stale_hosts, vacate
from .vm_status import SCHEDULED
from .vm_types import ClusterView, Event, Stage

log = get_logger(__name__)

PLACEMENT_WRITE_ATTEMPTS = 3


async def record_placement(rt: Runtime, body: Mapping[str, Any], placed: dict[str, Any]
                           ) -> tuple[str, dict[str, Any] | None]:
    """Write a placement into the VM's status with its resourceVersion as precondition, before the
    domain exists. A conflict re-reads the VM: a placement recorded meanwhile (another instance, or
    our own earlier write whose answer was lost) wins; otherwise ours is written on the fresh version.
    Returns the host the status names and the object as last seen (None when it is gone)."""
    meta = body.get("metadata") or {}
    namespace, name = meta.get("namespace", ""), meta.get("name", "")
    version = meta.get("resourceVersion")
    leaving = (body.get("status") or {}).get("host")  # a VM leaving an out-of-service host: not a placement
    for _ in range(PLACEMENT_WRITE_ATTEMPTS):
        try:
            written = await rt.kube.patch_status("virtualmachines", namespace, name, placed, resource_version=version)
        except ConflictError:
            fresh = await rt.kube.get_object("virtualmachines", name, namespace)
            if fresh is None:
                break
            recorded = (fresh.get("status") or {}).get("host")
            if recorded and recorded != leaving:
                return str(recorded), fresh
            version = fresh["metadata"]["resourceVersion"]
            continue
        if written is None:
            break
        return str(placed["host"]), written
    raise AppError(ErrorCode.KUBERNETES_API_ERROR,
                   f"the placement of VirtualMachine {namespace}/{name} could not be recorded (the object kept "
                   "changing or is gone); nothing was created", {"host": str(placed["host"])})


async def _reachable(rt: Runtime, name: str, host_obj: Mapping[str, Any] | None) -> Any:
    """The host's pooled connection, opened when the host is Ready; None when it cannot be asked."""
    conn = rt.pool.get(name)
    if conn is None and host_obj is not None and plan.HostView.from_object(host_obj).ready:
        try:
            conn = await host_connection(rt, name, host_obj)
        except AppError:
            return None
    return conn


async def find_own_domain(rt: Runtime, uid: str, hosts: list[str], view: ClusterView,
                          absent: set[str] | None = None) -> str | None:
    """The host among these that has a domain with UUID `uid` (a running one first), or None. Hosts
    that cannot be asked are skipped: they are not placed on either (not Ready). `absent` gets the
    hosts known to have no such domain (their answer, or their list: view.absent_from); not a host
    that could not be asked."""
    async def look(name: str) -> tuple[str, DomainObservation] | None:
        conn = await _reachable(rt, name, view.hosts.get(name))
        if conn is None:
            return None
        try:
            details = await conn.call("get_domain", lambda c: domains.get_domain(c, uid))
        except AppError as err:
            log.info("could not look for the VM's domain on a host", host=name, uid=uid, code=err.code.value)
            return None
        if details is None and absent is not None:
            absent.add(name)
        return (name, details.observation) if details is not None else None

    # Hosts certain not to have it are not asked (in a burst of new VMs: none is).
    unknown = []
    for h in sorted(hosts):
        if view.absent_from is not None and view.absent_from(h, uid):
            if absent is not None:
                absent.add(h)
        else:
            unknown.append(h)
    found = [f for f in await asyncio.gather(*(look(h) for h in unknown)) if f is not None]
    if not found:
        return None
    if len(found) > 1:
        log.warning("the VM's UUID is defined on several hosts; keeping one, the others are left untouched",
                    uid=uid, hosts=[f[0] for f in found])
    found.sort(key=lambda f: (not f[1].active, f[0]))
    return found[0][0]


async def place(spec: VirtualMachineSpec, meta: Mapping[str, Any], generation: int, body: Mapping[str, Any],
                status: dict[str, Any], view: ClusterView, rt: Runtime, events: list[Event],
                departure: Departure | None, stage: Stage | None = None) -> str:
    """Place an unplaced VM (or one leaving an out-of-service host: `departure`): its own domain found on a
    host wins; otherwise choose_host. The decision is recorded in status (status.host + Scheduled) before
    anything exists on the host, and returned (another writer's recorded placement wins). A VM that
    leaves vacates its old host only once a new one is chosen: with no other host, it stays as it was.
    `stage.placed_fresh` tells whether the chosen host is known to have no domain of this VM."""
    uid, namespace = str(meta.get("uid") or ""), str(meta.get("namespace") or "")
    views = [plan.HostView.from_object(h) for h in view.hosts.values()]
    avoid = departure.avoid if departure is not None else frozenset(stale_hosts(status))
    # A domain with this UUID already on a host this VM could be on (an earlier placement whose
    # status write was lost, or a status wiped since): that host, never a second domain. Never a
    # host it left (out of service, or still holding a stale copy).
    absent: set[str] = set()
    host = await find_own_domain(rt, uid, [v.name for v in views if plan.matches_selector(v, spec)
                                           and not v.out_of_service and v.name not in avoid], view, absent)
    fresh = False
    if host is not None:
        events.append(("Normal", "Adopted", f"found its domain (UUID {uid}) on LibvirtHost {host}"))
    else:
        labels = await view.labels_if_needed(
            [v for v in views if plan.matches_selector(v, spec)], namespace)
        placement = plan.choose_host(
            spec, views, view.reservations_for(plan.capacity_hosts(spec, views), uid),
            namespace=namespace, namespace_labels=labels, avoid=avoid,
            shared_pools=departure.shared_pools if departure is not None else ())
        if placement.error is not None:
            raise placement.error
        host = placement.host
        assert host is not None
        fresh = host in absent
        events.append(("Normal", "Scheduled", f"placed on LibvirtHost {host}"))
    if departure is not None:
        await vacate(rt, departure, meta, status, events)
    # Visible to the next placement now, not once the status shows it.
    view.placed(uid, plan.placement_reservation(spec, host, uid))
    status["host"] = host
    status["conditions"] = set_condition(status.get("conditions") or [], SCHEDULED, True, "Scheduled",
                                         f"placed on LibvirtHost {host}", generation)
    if view.record_placement is not None:
        # Recorded BEFORE anything is created on the host: a placement that is not in the
        # status never has a domain, so a retry can never start the VM on a second host.
        placed = {"host": host, "conditions": status["conditions"]}
        if departure is not None:  # with the new host, in one write: the copy left behind
            placed[STALE_HOSTS] = status.get(STALE_HOSTS)
        try:
            recorded = await view.record_placement(body, placed)
        except AppError:
            view.placed(uid, None)
            status.pop("host", None)
            raise
        if recorded != host:  # another writer placed it first: theirs holds
            host, fresh = recorded, False
            view.placed(uid, plan.placement_reservation(spec, host, uid))
            status["host"] = host
    if stage is not None:
        stage.placed_fresh = fresh
    return host

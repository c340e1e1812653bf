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
from ..core.logs import get_logger
from . import plan
from .host import host_connection
from .runtime import Runtime
from .vm_types import ClusterView

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
    for _ in range(PLACEMENT_WRITE_ATTEMPTS):
        try:
            written = await rt.kube.patch_status("virtualmachines", namespace, name, placed, resource_version=version)
        except ConflictError:
            fresh = await rt.kube.get_object("virtualmachines", name, namespace)
            if fresh is None:
                break
            recorded = (fresh.get("status") or {}).get("host")
            if recorded:
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


async def find_own_domain(rt: Runtime, uid: str, hosts: list[str], view: ClusterView) -> str | None:
    """The host among these that has a domain with UUID `uid` (a running one first), or None. Hosts
    that cannot be asked are skipped: they are not placed on either (not Ready)."""
    async def look(name: str) -> tuple[str, DomainObservation] | None:
        conn = await _reachable(rt, name, view.hosts.get(name))
        if conn is None:
            return None
        try:
            details = await conn.call("get_domain", lambda c: domains.get_domain(c, uid))
        except AppError as err:
            log.info("could not look for the VM's domain on a host", host=name, uid=uid, code=err.code.value)
            return None
        return (name, details.observation) if details is not None else None

    found = [f for f in await asyncio.gather(*(look(h) for h in sorted(hosts))) if f is not None]
    if not found:
        return None
    if len(found) > 1:
        log.warning("the VM's UUID is defined on several hosts; keeping one, the others are left untouched",
                    uid=uid, hosts=[f[0] for f in found])
    found.sort(key=lambda f: (not f[1].active, f[0]))
    return found[0][0]

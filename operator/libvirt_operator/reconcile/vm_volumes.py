"""A VM's volumes on its host: created (or cloned from a base image) when missing, the pool
commitment checked after thin volumes were created, and the informational status.volumes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..adapters.libvirt import domains
from ..adapters.libvirt.pools import pool_commitment
from ..core.api.vm import VirtualMachineSpec
from ..core.conditions import get_condition, remove_condition, set_condition
from ..core.domain import DiskDefinition, volume_name
from ..core.errors import AppError
from ..core.logs import get_logger
from ..core.metrics import POOL_COMMITMENT_RATIO, VM_OPERATIONS
from ..core.quantity import parse_quantity
from . import plan, vm_images
from .vm_types import Event

log = get_logger(__name__)


def recorded_volumes(old_status: Mapping[str, Any]) -> frozenset[str]:
    return frozenset(v["name"] for v in old_status.get("volumes") or [] if isinstance(v, dict) and v.get("name"))


async def ensure_disk_volumes(spec: VirtualMachineSpec, uid: str, hv: plan.HostView, conn: Any,
                          disks: list[DiskDefinition], events: list[Event], recorded: frozenset[str] = frozenset()
                          ) -> tuple[list[dict[str, str]], list[DiskDefinition], set[str]]:
    """Each volume disk gets the volume named with the VM's uid (created when missing), or the
    earlier-scheme volume its own domain already uses. The returned list is the informational
    status.volumes; it is read back for one thing only: a cloned volume the last status recorded is
    never copied again (`recorded`: protects a disk whose domain was undefined out of band)."""
    requests = []
    clones = vm_images.clone_requests(spec, uid, hv)  # disks from a base image (volume.source)
    cloned = {c.disk for c in clones}
    for disk in spec.disks:
        if disk.volume is not None and disk.name not in cloned and disk.volume.size is not None:
            pool = disk.volume.pool or hv.default_pool
            requests.append(domains.VolumeRequest(pool, volume_name(uid, disk.name), parse_quantity(disk.volume.size),
                                                  disk.name, shared=pool in hv.shared_pools))
    if not requests and not clones:
        return [], disks, set()
    results = await conn.call("ensure_volumes", lambda c: domains.ensure_volumes(c, uid, requests)) if requests else []
    results = [*results, *await vm_images.ensure_clones(conn, uid, clones, recorded)]
    by_disk = {r.disk: r for r in results}
    out = []
    for d in disks:
        if d.device == "disk":
            r = by_disk[d.name]
            out.append(dataclasses.replace(d, path=r.path, pool=r.pool, volume=r.name))
        else:
            out.append(d)
    created = [r.name for r in results if r.created]
    if created:
        VM_OPERATIONS.labels("create_volume").inc(len(created))
        events.append(("Normal", "VolumesCreated", f"created volume(s) {', '.join(created)}"))
    volumes = [{"disk": d.name, "pool": d.pool or "", "name": d.volume or ""} for d in out if d.device == "disk"]
    return volumes, out, {r.pool for r in results if r.created}


STORAGE_OVERCOMMITTED = "StorageOvercommitted"


async def check_commitment(host: str, pools: list[str], conn: Any, status: dict[str, Any], events: list[Event],
                            generation: int) -> None:
    """After creating thin volumes: do the pool's volumes now promise more than it holds? Reported on
    the VM (condition StorageOvercommitted, a Warning Event) and as a per-pool metric; the VM keeps
    running either way (a guest that fills its disk then fails its writes)."""
    over = []
    for pool in pools:
        try:
            committed, capacity = await conn.call("pool_commitment", lambda c, p=pool: pool_commitment(c, p))
        except AppError as err:
            log.info("pool commitment not measured", host=host, pool=pool, code=err.code.value)
            continue
        if capacity > 0:
            POOL_COMMITMENT_RATIO.labels(host, pool).set(committed / capacity)
        if committed > capacity:
            over.append(f"pool {pool} on {host}: its volumes may grow to {committed / 2**30:.1f} GiB, it holds "
                        f"{capacity / 2**30:.1f} GiB")
    conditions = status.get("conditions") or []
    if over:
        message = "; ".join(over) + " (thin volumes overcommit it: guests fail writes when it fills up)"
        if (get_condition(conditions, STORAGE_OVERCOMMITTED) or {}).get("status") != "True":
            events.append(("Warning", "PoolOvercommitted", message))
        status["conditions"] = set_condition(conditions, STORAGE_OVERCOMMITTED, True, "PoolOvercommitted", message,
                                             generation)
    else:
        status["conditions"] = remove_condition(conditions, STORAGE_OVERCOMMITTED)


async def existing_volumes(spec: VirtualMachineSpec, uid: str, hv: plan.HostView, conn: Any,
                            recorded: frozenset[str] = frozenset()) -> list[dict[str, str]]:
    """The VM's uid-named volumes that exist on the host (informational status.volumes, after a failure).
    A disk copied from an image counts only if the last status recorded it: after a failed or timed-out
    copy the volume exists at full size with partial content, and a recorded clone is never copied again."""
    found = []
    for disk in spec.disks:
        if disk.volume is None:
            continue
        pool, name = disk.volume.pool or hv.default_pool, volume_name(uid, disk.name)
        if disk.volume.source is not None and name not in recorded:
            continue
        try:
            path = await conn.call("volume_path", lambda c, p=pool, v=name: domains.volume_path(c, p, v))
        except AppError:
            continue
        if path is not None:
            found.append({"disk": disk.name, "pool": pool, "name": name})
    return found

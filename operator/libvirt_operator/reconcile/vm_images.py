"""Disks from images: which of a VM's volumes are cloned from a base volume, and cloning them on the
host (adapters.libvirt.clone). The base is only read; the clone is named with the VM's uid."""

from __future__ import annotations

from typing import Any

from ..adapters.libvirt import clone
from ..adapters.libvirt.domains import VolumeResult
from ..core.api.vm import VirtualMachineSpec
from ..core.domain import volume_name
from ..core.quantity import parse_quantity
from . import plan

# A full copy runs qemu-img convert on the host: give it time (the default call timeout is short).
FULL_CLONE_TIMEOUT = 1800.0


def clone_requests(spec: VirtualMachineSpec, uid: str, hv: plan.HostView) -> list[clone.CloneRequest]:
    out = []
    for disk in spec.disks:
        vol = disk.volume
        if vol is None or vol.source is None:
            continue
        out.append(clone.CloneRequest(
            pool=vol.pool or hv.default_pool, name=volume_name(uid, disk.name), disk=disk.name,
            source_pool=vol.source.volume.pool, source_name=vol.source.volume.name, mode=vol.clone or clone.BACKING,
            size_bytes=parse_quantity(vol.size) if vol.size is not None else None))
    return out


async def ensure_clones(conn: Any, uid: str, requests: list[clone.CloneRequest],
                        finished: frozenset[str] = frozenset()) -> list[VolumeResult]:
    """`finished`: volume names the VM's last status recorded (copies known to be complete)."""
    if not requests:
        return []
    full = any(r.mode == clone.FULL for r in requests)
    # A full copy may run for many minutes: it takes one of the host's stream slots, never a call slot.
    return await conn.call("clone_volumes", lambda c: clone.clone_volumes(c, uid, requests, finished),
                           timeout=FULL_CLONE_TIMEOUT if full else None, stream=full)

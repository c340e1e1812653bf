"""Install media of a VM's cdroms: the ISOImage volume each cdrom attaches on the VM's host (derived
from the ISOImage's identity, checked to exist there), and ejecting the media after the first run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..adapters.libvirt import domains
from ..adapters.libvirt.volumes import volume_name as iso_volume_name
from ..core.api.vm import VirtualMachineSpec
from ..core.domain import DiskDefinition
from ..core.errors import AppError, ErrorCode
from . import plan
from .vm_types import ClusterView, Event, Stage


def eject_media(status: dict[str, Any], events: list[Event]) -> None:
    status["mediaEjected"] = True
    events.append(("Normal", "MediaEjected", "the first run ended: install media removed from the cdroms"))


def _iso_volume(iso: Mapping[str, Any], namespace: str, ref: str, hv: plan.HostView) -> tuple[str, str] | None:
    """(pool, volume) the importer gives this ISOImage on this host, derived from the ISOImage's own
    identity (namespace, name, checksum) and the pool rule, never from the pool/volume in its status:
    whoever can write that status cannot point a cdrom at another image's or tenant's volume."""
    iso_spec = iso.get("spec") or {}
    checksum = iso_spec.get("checksum") or (iso.get("status") or {}).get("verifiedChecksum")
    if not checksum:
        return None
    try:
        volume = iso_volume_name(namespace, ref, str(checksum))
    except ValueError:
        return None
    return iso_spec.get("pool") or hv.default_pool, volume


async def resolve_media(spec: VirtualMachineSpec, namespace: str, host: str, hv: plan.HostView, conn: Any,
                         view: ClusterView, stage: Stage, ejected: bool = False) -> list[DiskDefinition]:
    """Disk definitions; cdroms point at the ISOImage volume's path on this host (empty once ejected).
    The volume's name is derived from the ISOImage and checked to exist on the host."""
    disks: list[DiskDefinition] = []
    for disk in spec.disks:
        if disk.cdrom is None:
            disks.append(DiskDefinition(disk.name, "disk", None, "qcow2", disk.boot_order))
            continue
        if ejected:
            disks.append(DiskDefinition(disk.name, "cdrom", None, "raw", disk.boot_order))
            continue
        ref = disk.cdrom.iso_image_ref.name
        iso = view.iso(namespace, ref)
        entry = expected = None
        if iso is not None:
            # The import's progress as reported; what is attached is decided below, from the host.
            entry = next((h for h in (iso.get("status") or {}).get("hosts") or []
                          if h.get("host") == host and h.get("phase") == "Ready"), None)
            expected = _iso_volume(iso, namespace, ref, hv)
        if entry is None or expected is None:
            stage.waiting_media = True
            why = "does not exist" if iso is None else f"is not Ready on LibvirtHost {host}"
            raise AppError(ErrorCode.ISO_NOT_FOUND, f"ISOImage {namespace}/{ref} for disk {disk.name} {why}",
                           {"isoImage": ref, "host": host, "disk": disk.name})
        pool, vol = expected
        path = await conn.call("volume_path", lambda c, p=pool, v=vol: domains.volume_path(c, p, v))
        if path is None:
            stage.waiting_media = True
            raise AppError(ErrorCode.ISO_NOT_FOUND,
                           f"volume {vol} of ISOImage {namespace}/{ref} is missing from pool {pool} on {host}",
                           {"isoImage": ref, "host": host, "pool": pool, "volume": vol})
        disks.append(DiskDefinition(disk.name, "cdrom", path, "raw", disk.boot_order, pool, vol))
    return disks

"""Disks from images: a VM's own volume created from an existing base volume (blocking; host threads).

``backing``: a qcow2 overlay whose backing file is the base (libvirt writes the backing format into
the overlay, so QEMU never probes it); QEMU opens the base read-only. ``full``: an independent qcow2
copy (libvirt createXMLFrom, qemu-img convert on the host). Either way the base is only read, and the
new volume is named with the VM's uid, so deleting the VM deletes it and never the base.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from collections.abc import Iterable

import libvirt

from ...core.domain import owns_volume
from ...core.errors import AppError, ErrorCode
from .domains import VolumeResult
from .pools import active_pool, find_pool, find_volume

BACKING, FULL = "backing", "full"


@dataclasses.dataclass(frozen=True)
class CloneRequest:
    pool: str                 # where the VM's volume goes
    name: str                 # lvop-<uid>-<disk>
    disk: str
    source_pool: str
    source_name: str
    mode: str = BACKING
    size_bytes: int | None = None  # None: the base's size


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _base(conn: libvirt.virConnect, req: CloneRequest) -> libvirt.virStorageVol:
    pool = find_pool(conn, req.source_pool)
    if pool is None or not pool.isActive():
        raise AppError(ErrorCode.IMAGE_NOT_FOUND,
                       f"base volume {req.source_name} for disk {req.disk}: storage pool {req.source_pool} does not "
                       "exist" + ("" if pool is None else " or is not active"),
                       {"disk": req.disk, "pool": req.source_pool, "volume": req.source_name})
    vol = find_volume(pool, req.source_name)
    if vol is None:
        try:
            pool.refresh(0)  # copied into a directory pool by hand, not seen by libvirt yet
        except libvirt.libvirtError:
            pass
        vol = find_volume(pool, req.source_name)
    if vol is None:
        raise AppError(ErrorCode.IMAGE_NOT_FOUND,
                       f"base volume {req.source_name} for disk {req.disk} does not exist in storage pool "
                       f"{req.source_pool}", {"disk": req.disk, "pool": req.source_pool, "volume": req.source_name})
    return vol


def _format(vol: libvirt.virStorageVol) -> str:
    fmt = ET.fromstring(vol.XMLDesc(0)).find("./target/format")
    return (fmt.get("type") if fmt is not None else None) or "raw"


def clone_xml(name: str, capacity: int, backing_path: str | None = None, backing_format: str | None = None) -> str:
    """<volume> XML of a qcow2 volume, optionally with a backing store (ElementTree: values escaped)."""
    root = ET.Element("volume")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "capacity", unit="bytes").text = str(capacity)
    ET.SubElement(root, "allocation", unit="bytes").text = "0"
    ET.SubElement(ET.SubElement(root, "target"), "format", type="qcow2")
    if backing_path is not None:
        backing = ET.SubElement(root, "backingStore")
        ET.SubElement(backing, "path").text = backing_path
        ET.SubElement(backing, "format", type=backing_format or "raw")
    return ET.tostring(root, encoding="unicode")


def _used_by_domain(conn: libvirt.virConnect, uid: str, path: str) -> bool:
    """The VM's own domain (persistent or running definition) has this volume as a disk."""
    try:
        dom = conn.lookupByUUIDString(uid)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise
    flags = (0, libvirt.VIR_DOMAIN_XML_INACTIVE) if dom.isActive() else (libvirt.VIR_DOMAIN_XML_INACTIVE,)
    # Every disk, not only those our builder named: a domain from any earlier scheme counts too.
    return any(src.get("file") == path for f in flags
               for src in ET.fromstring(dom.XMLDesc(f)).iterfind("./devices/disk/source"))


def _discard_unfinished(conn: libvirt.virConnect, uid: str, vol: libvirt.virStorageVol, req: CloneRequest,
                        finished: frozenset[str]) -> bool:
    """True when `vol` is the VM's finished copy: recorded as such (`finished`, the volumes of the
    VM's last status) or a disk of its domain. Otherwise it was never handed to a guest and may be a
    copy cut short (an operator killed during a long full copy, or libvirtd dying during it): it is
    deleted so the caller copies again, which loses nothing. A copy libvirtd is still writing cannot
    be deleted yet: the reconcile waits and looks again."""
    if req.name in finished or _used_by_domain(conn, uid, vol.path()):
        return True
    try:
        vol.delete(0)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
            return False
        raise AppError(ErrorCode.LIBVIRT_ERROR,
                       f"volume {req.pool}/{req.name} exists but is not known to hold a finished copy of "
                       f"{req.source_pool}/{req.source_name}, and it cannot be replaced yet (libvirt: "
                       f"{err.get_error_message()}); a copy may still be running on the host",
                       {"pool": req.pool, "volume": req.name}, cause=err) from err
    return False


def clone_one(conn: libvirt.virConnect, uid: str, req: CloneRequest,
              finished: frozenset[str] = frozenset()) -> VolumeResult:
    """The VM's volume for this disk: kept when it exists as a finished copy, else (re)cloned now."""
    if not owns_volume(uid, req.name):
        raise AppError(ErrorCode.INVALID_SPEC, f"volume {req.name} is not named for VirtualMachine uid {uid}",
                       {"volume": req.name[:64]})
    pool = active_pool(conn, req.pool)
    existing = find_volume(pool, req.name)
    if existing is not None and _discard_unfinished(conn, uid, existing, req, finished):
        return VolumeResult(req.pool, existing.name(), existing.path(), False, req.disk)
    base = _base(conn, req)
    base_capacity = int(base.info()[1])
    size = req.size_bytes if req.size_bytes is not None else base_capacity
    if size < base_capacity:
        raise AppError(ErrorCode.VOLUME_SHRINK_REFUSED,
                       f"disk {req.disk}: size {_gib(size)} is smaller than its base volume {req.source_pool}/"
                       f"{req.source_name} ({_gib(base_capacity)}); volumes are never shrunk: set size to at least "
                       f"{_gib(base_capacity)} or leave it out",
                       {"disk": req.disk, "pool": req.source_pool, "volume": req.source_name,
                        "sizeBytes": str(size), "baseBytes": str(base_capacity)})
    if req.mode == FULL:
        vol = pool.createXMLFrom(clone_xml(req.name, base_capacity), base, 0)
        try:
            if size > int(vol.info()[1]):
                vol.resize(size, 0)
        except libvirt.libvirtError:
            vol.delete(0)  # never leave a copy of the wrong size behind
            raise
    else:
        vol = pool.createXML(clone_xml(req.name, size, base.path(), _format(base)), 0)
    return VolumeResult(req.pool, vol.name(), vol.path(), True, req.disk)


def clone_volumes(conn: libvirt.virConnect, uid: str, requests: Iterable[CloneRequest],
                  finished: frozenset[str] = frozenset()) -> list[VolumeResult]:
    return [clone_one(conn, uid, req, finished) for req in requests]

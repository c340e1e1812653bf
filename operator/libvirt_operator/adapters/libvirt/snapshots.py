"""Internal qcow2 snapshots of a domain (blocking; run through ``HostConnection.call``).

Why internal, not external: see reconcile/snapshot.py (checked on the real daemon). The domain is always
found by its UUID (the VM's uid) and the snapshot by its name (from the VirtualMachineSnapshot's uid).
"""

from __future__ import annotations

import dataclasses
import time
import xml.etree.ElementTree as ET

import libvirt

from ...core.errors import AppError, ErrorCode
from ...core.snapshot import DiskInfo, DomainSnapshotView

_ALIAS = "ua-disk-"
_NO_SNAPSHOT = (libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT,)
_NO_DOMAIN = (libvirt.VIR_ERR_NO_DOMAIN,)
DESTROY_WAIT_SECONDS = 10.0


def _domain(conn: libvirt.virConnect, uuid: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as err:
        if err.get_error_code() in _NO_DOMAIN:
            return None
        raise


def _snapshot(dom: libvirt.virDomain, name: str) -> libvirt.virDomainSnapshot | None:
    try:
        return dom.snapshotLookupByName(name, 0)
    except libvirt.libvirtError as err:
        if err.get_error_code() in _NO_SNAPSHOT:
            return None
        raise


def parse_disks(xml: str) -> DomainSnapshotView:
    """The domain's disks (from its definition) and whether it has writable UEFI NVRAM."""
    root = ET.fromstring(xml)
    disks = []
    for el in root.iterfind("./devices/disk"):
        driver, target, source, alias = (el.find(t) for t in ("driver", "target", "source", "alias"))
        name = (alias.get("name") or "") if alias is not None else ""
        disks.append(DiskInfo(
            target=target.get("dev", "") if target is not None else "",
            device=el.get("device", "disk"),
            format=driver.get("type") if driver is not None else None,
            name=name[len(_ALIAS):] if name.startswith(_ALIAS) else None,
            path=source.get("file") if source is not None else None,
            source_type=el.get("type", "file"),
            readonly=el.find("readonly") is not None))
    loader = root.find("./os/loader")
    pflash = (loader is not None and loader.get("type") == "pflash") or root.find("./os/nvram") is not None \
        or (root.find("./os") is not None and root.find("./os").get("firmware") == "efi")  # type: ignore[union-attr]
    return DomainSnapshotView(active=False, disks=tuple(disks), pflash=pflash)


def snapshot_view(conn: libvirt.virConnect, uuid: str) -> DomainSnapshotView | None:
    """What a snapshot of this domain would capture; None when the domain does not exist."""
    dom = _domain(conn, uuid)
    if dom is None:
        return None
    active = bool(dom.isActive())
    # The running definition when it runs (that is what QEMU snapshots), else the persistent one.
    view = parse_disks(dom.XMLDesc(0 if active else libvirt.VIR_DOMAIN_XML_INACTIVE))
    return dataclasses.replace(view, active=active)


def snapshot_xml(name: str, description: str, disks: tuple[DiskInfo, ...], skipped: tuple[DiskInfo, ...],
                 online: bool) -> str:
    """<domainsnapshot> built with ElementTree: internal snapshots of `disks`, none of `skipped`."""
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "description").text = description
    if online:
        ET.SubElement(root, "memory", snapshot="internal")
    el = ET.SubElement(root, "disks")
    for disk in disks:
        ET.SubElement(el, "disk", name=disk.target, snapshot="internal")
    for disk in skipped:
        if disk.target:
            ET.SubElement(el, "disk", name=disk.target, snapshot="no")
    return ET.tostring(root, encoding="unicode")


@dataclasses.dataclass(frozen=True)
class DiskUsage:
    target: str
    volume: str | None
    capacity: int | None
    allocation: int | None


@dataclasses.dataclass(frozen=True)
class Created:
    existed: bool      # taken by an earlier attempt (its answer was lost): not taken twice
    online: bool
    disks: tuple[DiskUsage, ...]


def _usage(conn: libvirt.virConnect, disk: DiskInfo) -> DiskUsage:
    if not disk.path:
        return DiskUsage(disk.target, None, None, None)
    try:
        vol = conn.storageVolLookupByPath(disk.path)
        _kind, capacity, allocation = vol.info()
        return DiskUsage(disk.target, vol.name(), int(capacity), int(allocation))
    except libvirt.libvirtError:
        return DiskUsage(disk.target, disk.path.rsplit("/", 1)[-1], None, None)  # not in a pool: name only


def create(conn: libvirt.virConnect, uuid: str, name: str, xml: str, disks: tuple[DiskInfo, ...],
           online: bool) -> Created | None:
    """Take the snapshot (once: an existing one of this name is the same snapshot); None when the
    domain is gone. libvirt refuses when the domain's state changed since the plan (e.g. it started:
    the offline XML has no memory element) and the caller plans again."""
    dom = _domain(conn, uuid)
    if dom is None:
        return None
    existed = _snapshot(dom, name) is not None
    if not existed:
        if bool(dom.isActive()) != online:
            raise AppError(ErrorCode.LIBVIRT_ERROR, "the VM started or stopped while its snapshot was planned; "
                                                    "planning again", {"operation": "snapshot.create"})
        dom.snapshotCreateXML(xml, 0)
    return Created(existed, online, tuple(_usage(conn, d) for d in disks))


def exists(conn: libvirt.virConnect, uuid: str, name: str) -> bool:
    dom = _domain(conn, uuid)
    return dom is not None and _snapshot(dom, name) is not None


def delete(conn: libvirt.virConnect, uuid: str, name: str) -> bool:
    """Delete the snapshot (the VM running or not); False when it, or the domain, is already gone."""
    dom = _domain(conn, uuid)
    if dom is None:
        return False
    snap = _snapshot(dom, name)
    if snap is None:
        return False
    snap.delete(0)
    return True


def _was_online(snap: libvirt.virDomainSnapshot) -> bool:
    state = ET.fromstring(snap.getXMLDesc(0)).findtext("state") or ""
    return state in ("running", "paused", "blocked", "pmsuspended")


@dataclasses.dataclass(frozen=True)
class Reverted:
    found: bool
    online: bool = False
    targets: tuple[str, ...] = ()


def revert(conn: libvirt.virConnect, uuid: str, name: str) -> Reverted:
    """Put the disks back to the snapshot. The caller made sure the domain is shut off (and holds the VM).
    An online snapshot carries the guest's memory: libvirt reverts to it paused, and it is powered off
    at once, so only the disks come back. libvirt also puts back the definition saved with the snapshot;
    the VM reconcile redefines from the spec afterwards."""
    dom = _domain(conn, uuid)
    snap = _snapshot(dom, name) if dom is not None else None
    if dom is None or snap is None:
        return Reverted(False)
    if dom.isActive():
        raise AppError(ErrorCode.RESTORE_TARGET_RUNNING, "the VM's domain is running: a restore needs it stopped")
    root = ET.fromstring(snap.getXMLDesc(0))
    targets = tuple(d.get("name", "") for d in root.iterfind("./disks/disk") if d.get("snapshot") == "internal")
    online = _was_online(snap)
    if online:
        dom.revertToSnapshot(snap, libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED)
        deadline = time.monotonic() + DESTROY_WAIT_SECONDS
        while dom.isActive():
            try:
                dom.destroy()
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)
    else:
        dom.revertToSnapshot(snap, 0)
    return Reverted(True, online, targets)

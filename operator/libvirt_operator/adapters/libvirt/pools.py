"""Storage pool and volume lookups shared by the domain and ISO volume code (blocking; host threads)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import libvirt

from ...core.errors import AppError, ErrorCode

_VOL_NOT_FOUND = (libvirt.VIR_ERR_NO_STORAGE_VOL,)


def active_pool(conn: libvirt.virConnect, name: str) -> libvirt.virStoragePool:
    """The pool, or STORAGE_POOL_NOT_FOUND when it exists but is not started."""
    pool = conn.storagePoolLookupByName(name)
    if not pool.isActive():
        raise AppError(ErrorCode.STORAGE_POOL_NOT_FOUND, f"storage pool {name} is not active", {"pool": name})
    return pool


def find_pool(conn: libvirt.virConnect, name: str) -> libvirt.virStoragePool | None:
    try:
        return conn.storagePoolLookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
            return None
        raise


def find_volume(pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
    try:
        return pool.storageVolLookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() in _VOL_NOT_FOUND:
            return None
        raise


def volume_xml(name: str, capacity_bytes: int, fmt: str) -> str:
    """<volume> XML built from values (ElementTree escapes them: no injection through names)."""
    root = ET.Element("volume")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "capacity", unit="bytes").text = str(capacity_bytes)
    ET.SubElement(root, "allocation", unit="bytes").text = "0"
    ET.SubElement(ET.SubElement(root, "target"), "format", type=fmt)
    return ET.tostring(root, encoding="unicode")

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


def pool_space_blocking(conn: libvirt.virConnect, name: str) -> tuple[int, int]:
    """(capacity, available) bytes of an active pool, refreshed first (a dir pool then reports its
    filesystem's free space). STORAGE_POOL_NOT_FOUND when it is missing or not started."""
    pool = active_pool(conn, name)  # a missing pool: libvirtError, classified STORAGE_POOL_NOT_FOUND
    try:
        pool.refresh(0)
    except libvirt.libvirtError:
        pass  # a refresh racing another one is harmless
    _state, capacity, _allocation, available = pool.info()
    return int(capacity), int(available)


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


def pool_commitment(conn: libvirt.virConnect, name: str) -> tuple[int, int]:
    """(sum of the virtual sizes of the pool's volumes, pool capacity) in bytes: thin volumes (qcow2)
    can promise more than the pool holds; the first number above the second is an overcommitted pool."""
    pool = active_pool(conn, name)
    _state, capacity, _allocation, _available = pool.info()
    committed = 0
    for vol in pool.listAllVolumes(0):
        try:
            committed += int(vol.info()[1])
        except libvirt.libvirtError as err:
            if err.get_error_code() not in _VOL_NOT_FOUND:
                raise  # a volume deleted meanwhile counts nothing
    return committed, int(capacity)

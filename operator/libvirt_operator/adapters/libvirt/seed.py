"""The cloud-init NoCloud seed on a host: an ISO 9660 image labelled ``cidata`` (built in memory with
pycdlib: Rock Ridge names for Linux, Joliet for Windows' cloudbase-init), uploaded once per content
into the host's pool with the ISOImage upload path, and older seeds of the VM pruned once no running
domain uses them.

The seed holds user data (maybe from a Secret): it is written to a private temporary file only for
the upload's duration and never logged."""

from __future__ import annotations

import io
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from pathlib import Path

import libvirt
import pycdlib

from ...core.domain import owned_volume_prefix
from ...core.logs import get_logger
from .connection import HostConnection
from .pools import find_pool
from .volumes import UploadedVolume, read_volume, upload_volume, volume_info

log = get_logger(__name__)

# 8.3 names for plain ISO 9660 readers; the real names come from Rock Ridge and Joliet.
MAX_SEED_BYTES = 4 * 2**20  # far above any seed cloud-init accepts (user data is capped well below)
_ISO9660_NAMES = {"user-data": "/USERDATA.;1", "meta-data": "/METADATA.;1", "network-config": "/NETWORKC.;1"}


def build_seed_iso(files: Iterable[tuple[str, bytes]], label: str = "cidata") -> bytes:
    """The NoCloud seed image with these files at its root."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=label)
    try:
        for name, data in files:
            iso.add_fp(io.BytesIO(data), len(data), _ISO9660_NAMES[name], rr_name=name, joliet_path=f"/{name}")
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


def read_seed_iso(image: bytes) -> dict[str, bytes] | None:
    """The files at the root of a seed image, or None when the bytes are no readable seed (e.g. an
    upload cut short). Compared by content: two builds of one seed differ in their timestamps."""
    iso = pycdlib.PyCdlib()
    try:
        iso.open_fp(io.BytesIO(image))
    except Exception:  # noqa: BLE001  (pycdlib raises several types for damaged images)
        return None
    try:
        files = {}
        for name, iso_path in _ISO9660_NAMES.items():
            out = io.BytesIO()
            try:
                iso.get_file_from_iso_fp(out, iso_path=iso_path)
            except pycdlib.pycdlibexception.PyCdlibException:
                continue
            files[name] = out.getvalue()
        return files
    finally:
        iso.close()


async def ensure_seed(host: HostConnection, pool: str, volume: str,
                      files: Iterable[tuple[str, bytes]]) -> tuple[str, bool]:
    """(path of the seed volume, whether it was uploaded now). The name is a digest of the content,
    but an existing volume is reused only when its bytes are the seed's: an operator killed during
    the upload leaves a volume of the right name and size with partial content."""
    files = list(files)
    found = await volume_info(host, pool, volume)
    if found is not None and found[0] <= MAX_SEED_BYTES:
        content = await read_volume(host, pool, volume, MAX_SEED_BYTES)
        if content is None or read_seed_iso(content) == dict(files):  # None: test:// cannot read back
            return found[1], False
    if found is not None:
        log.warning("cloud-init seed volume does not hold its content; uploading it again",
                    pool=pool, volume=volume, size=found[0])
    image = build_seed_iso(files)
    # user-data may hold secrets: the image lives in an anonymous memory file, never on a disk
    # (a file in a spool directory would outlive an operator killed during the upload)
    fd = os.memfd_create("lvop-seed", os.MFD_CLOEXEC)
    try:
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(image)
        uploaded: UploadedVolume = await upload_volume(host, pool, volume, Path(f"/proc/self/fd/{fd}"))
    finally:
        os.close(fd)
    return uploaded.path, True


def _cdrom_sources(xml: str) -> set[str]:
    return {s.get("file", "") for s in ET.fromstring(xml).iterfind("./devices/disk[@device='cdrom']/source")}


def prune_seeds_blocking(conn: libvirt.virConnect, uid: str, pool_name: str, keep: str,
                         is_seed: Callable[[str], bool]) -> list[str]:
    """Delete this VM's other seed volumes (names `is_seed` accepts) in the pool, except those its
    running domain still has attached (the live definition keeps the old seed until the next boot).
    Returns the names deleted."""
    pool = find_pool(conn, pool_name)
    if pool is None or not pool.isActive():
        return []
    in_use: set[str] = set()
    try:
        dom = conn.lookupByUUIDString(uid)
        if dom.isActive():
            in_use = _cdrom_sources(dom.XMLDesc(0))
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
    deleted = []
    prefix = owned_volume_prefix(uid)
    for vol in pool.listAllVolumes(0):
        name = vol.name()
        if not name.startswith(prefix) or name == keep or not is_seed(name) or vol.path() in in_use:
            continue
        try:
            vol.delete(0)
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                raise
            continue
        deleted.append(name)
    return deleted

"""Disks from images on a real libvirtd: a full copy cut short is never handed to a guest.

A full copy (createXMLFrom) of a large base runs for minutes. When the operator is killed during it
(or libvirtd dies during it) the VM's volume exists under its final name with partial content, and
nothing on the host tells a finished copy from a partial one. The next reconcile must copy again,
unless the copy is known to be finished: recorded in the VM's last status, or a disk of its domain
(a guest may have written to it: never replaced)."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET

import pytest

from libvirt_operator.adapters.libvirt import clone
from libvirt_operator.adapters.libvirt.pools import find_volume
from libvirt_operator.adapters.libvirt.volumes import read_volume_blocking, upload_blocking
from libvirt_operator.core.domain import volume_name

MARK = b"LVOP-BASE-MARKER" * 4096  # one 64 KiB cluster, found as is inside the qcow2 copy
POOL = "default"


@pytest.fixture
def setup(libvirtd, tmp_path):
    conn = libvirtd.connect()
    base = f"base-{uuid.uuid4().hex[:8]}"
    image = tmp_path / "base.raw"
    image.write_bytes(MARK + bytes(2 * 2**20 - len(MARK)))
    upload_blocking(conn, POOL, base, image)
    uid = str(uuid.uuid4())
    req = clone.CloneRequest(pool=POOL, name=volume_name(uid, "root"), disk="root", source_pool=POOL,
                             source_name=base, mode=clone.FULL)
    yield conn, uid, req
    for name in (req.name, base):
        vol = find_volume(conn.storagePoolLookupByName(POOL), name)
        if vol is not None:
            vol.delete(0)
    conn.close()


def _cut_short(conn, name: str) -> None:
    """What an interrupted copy leaves: the final name, partial (here: no) content."""
    xml = f"<volume><name>{name}</name><capacity unit='bytes'>{2**20}</capacity><target><format type='raw'/></target></volume>"
    conn.storagePoolLookupByName(POOL).createXML(xml, 0)


def _copied(conn, name: str) -> bool:
    return MARK in (read_volume_blocking(conn, POOL, name, 8 * 2**20) or b"")


def test_an_unrecorded_copy_no_domain_uses_is_copied_again(setup) -> None:
    conn, uid, req = setup
    _cut_short(conn, req.name)
    assert not _copied(conn, req.name)
    result = clone.clone_one(conn, uid, req)
    assert result.created and _copied(conn, req.name)
    # Now finished and recorded by the status the reconcile writes: the next reconcile keeps it.
    again = clone.clone_one(conn, uid, req, frozenset({req.name}))
    assert not again.created and again.path == result.path


def test_a_recorded_copy_is_never_replaced(setup) -> None:
    conn, uid, req = setup
    _cut_short(conn, req.name)  # stands for a disk the guest has written since
    assert not clone.clone_one(conn, uid, req, frozenset({req.name})).created
    assert not _copied(conn, req.name)  # untouched


def test_a_copy_its_domain_uses_is_never_replaced(setup) -> None:
    conn, uid, req = setup
    _cut_short(conn, req.name)
    path = find_volume(conn.storagePoolLookupByName(POOL), req.name).path()
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = f"clone-test-{uid[:8]}"
    ET.SubElement(dom, "uuid").text = uid
    ET.SubElement(dom, "memory", unit="MiB").text = "64"
    ET.SubElement(ET.SubElement(dom, "os"), "type").text = "hvm"
    disk = ET.SubElement(ET.SubElement(dom, "devices"), "disk", type="file", device="disk")
    ET.SubElement(disk, "source", file=path)
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    defined = conn.defineXML(ET.tostring(dom, encoding="unicode"))
    try:
        assert not clone.clone_one(conn, uid, req).created  # status lost, but the domain has it
        assert not _copied(conn, req.name)
    finally:
        defined.undefine()


class _Direct:
    """The host connection's call(), run in place on the real connection (no pool, no thread)."""

    def __init__(self, conn) -> None:
        self.conn = conn

    async def call(self, _what, fn, **_kw):
        return fn(self.conn)


async def test_after_a_failed_reconcile_status_lists_a_copy_only_if_it_was_recorded(setup) -> None:
    """A copy that timed out (or a later disk that failed) leaves the volume at full size: the failure's
    status.volumes must not record it, or the next reconcile would take it as finished."""
    from libvirt_operator.core.api.vm import VirtualMachineSpec
    from libvirt_operator.reconcile import plan
    from libvirt_operator.reconcile.vm_volumes import existing_volumes

    conn, uid, req = setup
    _cut_short(conn, req.name)
    spec = VirtualMachineSpec.model_validate({"disks": [
        {"name": "root", "volume": {"source": {"volume": {"pool": POOL, "name": "base"}}, "clone": "full"}},
        {"name": "data", "volume": {"size": "1Mi"}}]})
    host = plan.HostView(name="h", default_pool=POOL)
    assert await existing_volumes(spec, uid, host, _Direct(conn)) == []
    assert await existing_volumes(spec, uid, host, _Direct(conn), frozenset({req.name})) == [
        {"disk": "root", "pool": POOL, "name": req.name}]

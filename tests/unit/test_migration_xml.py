"""The destination definition of a live migration: every disk source rewritten, none forgotten."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

pytest.importorskip("libvirt")

from libvirt_operator.adapters.libvirt.domain_xml import build_domain_xml  # noqa: E402
from libvirt_operator.adapters.libvirt.migration import destination_xml  # noqa: E402
from libvirt_operator.core.domain import DiskDefinition, DomainDefinition, Owner  # noqa: E402


def _xml() -> str:
    uid = "6f1c1a52-1e0b-4a55-9a43-6a9e0d0f2b11"
    return build_domain_xml(DomainDefinition(
        name="ns_vm", uuid=uid, vcpus=1, memory_bytes=64 * 2**20, type="qemu", firmware="bios",
        owner=Owner("ns", "vm", uid),
        disks=(DiskDefinition("cd", "cdrom", "/a/pool/boot.iso", boot_order=1),
               DiskDefinition("empty", "cdrom", None),
               DiskDefinition("data", "disk", "/a/pool/lvop-x-data"))))


def _sources(xml: str) -> dict[str, str | None]:
    out = {}
    for disk in ET.fromstring(xml).iterfind("./devices/disk"):
        src = disk.find("source")
        out[disk.find("target").get("dev")] = src.get("file") if src is not None else None
    return out


def test_every_disk_source_points_at_the_destination() -> None:
    xml = destination_xml(_xml(), {"hda": "/b/pool/boot.iso", "vda": "/b/pool/lvop-x-data"})
    assert _sources(xml) == {"hda": "/b/pool/boot.iso", "hdb": None, "vda": "/b/pool/lvop-x-data"}
    assert ET.fromstring(xml).findtext("name") == "ns_vm"


def test_a_disk_without_a_destination_path_or_an_unknown_target_is_refused() -> None:
    with pytest.raises(ValueError, match="no destination path for disk vda"):
        destination_xml(_xml(), {"hda": "/b/pool/boot.iso"})
    with pytest.raises(ValueError, match="no disk with target vdb"):
        destination_xml(_xml(), {"hda": "/b/boot.iso", "vda": "/b/data", "vdb": "/b/other"})

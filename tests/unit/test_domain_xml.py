"""Domain XML is built with ElementTree: hostile values stay text, and every field parses back."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from libvirt_operator.adapters.libvirt.domain_xml import (
    DomainXMLError, build_domain_xml, definition_hash, interface_macs, parse_metadata,
)
from libvirt_operator.core.domain import (
    METADATA_NS, DiskDefinition, DomainDefinition, InterfaceDefinition, Owner, domain_name, volume_name,
)

UID = "6f1c3c3e-8d6c-4a7e-9a55-1b2f0e3d4c5b"
M = f"{{{METADATA_NS}}}"


def defn(**kw) -> DomainDefinition:
    base = dict(
        name="ns_vm", uuid=UID, vcpus=2, memory_bytes=512 * 2**20, type="qemu", firmware="bios",
        owner=Owner("ns", "vm", UID),
        disks=(DiskDefinition("root", "disk", "/pool/ns_vm-root", "qcow2", 2, "default", "ns_vm-root"),
               DiskDefinition("data", "disk", "/pool/ns_vm-data"),
               DiskDefinition("media", "cdrom", "/pool/debian.iso", "raw", 1)),
        interfaces=(InterfaceDefinition("nic0", "user", None, "virtio", "52:54:00:AA:BB:CC"),
                    InterfaceDefinition("lan", "bridge", "br0", "e1000")),
    )
    base.update(kw)
    return DomainDefinition(**base)


def test_fields_parse_back():
    root = ET.fromstring(build_domain_xml(defn()))
    assert root.tag == "domain" and root.get("type") == "qemu"
    assert root.findtext("name") == "ns_vm" and root.findtext("uuid") == UID
    assert root.find("memory").get("unit") == "KiB" and root.findtext("memory") == str(512 * 1024)
    assert root.findtext("currentMemory") == str(512 * 1024)
    assert root.findtext("vcpu") == "2"
    assert root.find("os").get("firmware") is None and root.findtext("os/type") == "hvm"
    assert root.find("features/acpi") is not None
    disks = root.findall("devices/disk")
    assert [(d.get("device"), d.find("target").get("dev"), d.find("target").get("bus")) for d in disks] == [
        ("disk", "vda", "virtio"), ("disk", "vdb", "virtio"), ("cdrom", "hda", "ide")]
    assert disks[0].find("driver").get("type") == "qcow2" and disks[0].find("source").get("file") == "/pool/ns_vm-root"
    assert disks[0].find("boot").get("order") == "2" and disks[1].find("boot") is None
    assert disks[2].find("readonly") is not None and disks[2].find("driver").get("type") == "raw"
    assert disks[2].find("source").get("file") == "/pool/debian.iso" and disks[2].find("boot").get("order") == "1"
    assert [d.find("alias").get("name") for d in disks] == ["ua-disk-root", "ua-disk-data", "ua-disk-media"]
    nics = root.findall("devices/interface")
    assert nics[0].get("type") == "user" and nics[0].find("mac").get("address") == "52:54:00:aa:bb:cc"
    assert nics[0].find("model").get("type") == "virtio"
    assert nics[1].get("type") == "bridge" and nics[1].find("source").get("bridge") == "br0"
    serial = root.find("devices/serial")
    assert serial.get("type") == "pty"
    assert serial.find("log").get("file") == "/var/log/libvirt/qemu/ns_vm-serial.log"
    assert serial.find("log").get("append") == "on"
    assert root.find("devices/console/target").get("type") == "serial"


def test_metadata_records_owner_and_hash():
    d = defn()
    xml = build_domain_xml(d)
    root = ET.fromstring(xml)
    vm = root.find(f"metadata/{M}vm")
    assert vm is not None
    assert (vm.findtext(f"{M}namespace"), vm.findtext(f"{M}name"), vm.findtext(f"{M}uid")) == ("ns", "vm", UID)
    meta = parse_metadata(xml)
    assert meta.owner == Owner("ns", "vm", UID) and meta.definition_hash == definition_hash(d)
    assert "xmlns:lvop=" in xml  # a readable prefix for our namespace
    assert parse_metadata("<domain><name>foreign</name></domain>").owner is None


def test_hash_changes_with_the_definition_only():
    assert definition_hash(defn()) == definition_hash(defn())
    assert definition_hash(defn(vcpus=4)) != definition_hash(defn())
    assert definition_hash(defn(memory_bytes=2**30)) != definition_hash(defn())


def test_uefi_and_kvm():
    root = ET.fromstring(build_domain_xml(defn(firmware="uefi", type="kvm")))
    assert root.get("type") == "kvm" and root.find("os").get("firmware") == "efi"
    assert root.find("os/type").get("machine") == "q35"
    assert root.find("cpu").get("mode") == "host-passthrough"
    cdrom = root.find("devices/disk[@device='cdrom']/target")
    assert (cdrom.get("dev"), cdrom.get("bus")) == ("sda", "sata")  # q35 has no IDE


def test_too_many_ide_cdroms_is_an_error():
    disks = tuple(DiskDefinition(f"c{i}", "cdrom", f"/x/{i}.iso", "raw") for i in range(5))
    with pytest.raises(DomainXMLError):
        build_domain_xml(defn(disks=disks))


@pytest.mark.parametrize("evil", [
    "x</name><devices><disk type='file'><source file='/etc/shadow'/></disk></devices><name>",
    "a'b\"c&d<e>f",
    "]]><!-- -->&amp;&lt;",
])
def test_hostile_values_cannot_inject(evil):
    d = defn(name=evil, owner=Owner(evil, evil, UID),
             disks=(DiskDefinition("root", "disk", f"/pool/{evil}"),),
             interfaces=(InterfaceDefinition("nic0", "network", evil),))
    xml = build_domain_xml(d)
    root = ET.fromstring(xml)  # still well-formed
    assert root.findtext("name") == evil
    assert len(root.findall("name")) == 1 and len(root.findall("devices")) == 1
    assert len(root.findall("devices/disk")) == 1
    assert root.find("devices/disk/source").get("file") == f"/pool/{evil}"
    assert root.find("devices/interface/source").get("network") == evil
    assert parse_metadata(xml).owner == Owner(evil, evil, UID)
    if "<" in evil:
        assert evil not in xml  # only ever escaped


def test_interface_macs_from_aliases():
    xml = build_domain_xml(defn())
    assert interface_macs(xml) == {"nic0": "52:54:00:aa:bb:cc"}


def test_domain_name_is_deterministic_safe_and_unique():
    assert domain_name("prod", "web-1", UID) == "prod_web-1"
    assert domain_name("prod", "web.example", UID) == "prod_web.example"
    # `_` never occurs in Kubernetes names, so the join is unambiguous
    assert domain_name("a-b", "c", UID) != domain_name("a", "b-c", UID)
    assert domain_name("ns", "we<ird>'&", UID) == "ns_we-ird---"
    long_a = domain_name("ns", "x" * 200, "uid-1")
    long_b = domain_name("ns", "x" * 200, "uid-2")
    assert len(long_a) <= 63 and long_a != long_b
    assert long_a == domain_name("ns", "x" * 200, "uid-1")
    assert volume_name(UID, "root") == f"lvop-{UID}-root"  # more in test_volume_names.py

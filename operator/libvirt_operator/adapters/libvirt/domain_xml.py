"""Domain XML from a DomainDefinition, built with ElementTree only (never string templates), so
no value from a spec can change the document's structure."""

from __future__ import annotations

import dataclasses
import hashlib
import xml.etree.ElementTree as ET

from ...core.domain import METADATA_NS, METADATA_PREFIX, DomainDefinition, Owner

ET.register_namespace(METADATA_PREFIX, METADATA_NS)
_M = f"{{{METADATA_NS}}}"
MAX_IDE_CDROMS = 4


class DomainXMLError(ValueError):
    """The definition cannot be expressed (e.g. too many cdroms for the bus)."""


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, {k: v for k, v in attrs.items() if v is not None})
    if text is not None:
        el.text = text
    return el


def _dev_name(prefix: str, index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return prefix + letters


def _build(defn: DomainDefinition, definition_hash: str | None) -> ET.Element:
    root = ET.Element("domain", {"type": defn.type})
    _sub(root, "name", defn.name)
    _sub(root, "uuid", defn.uuid)

    meta = _sub(_sub(root, "metadata"), f"{_M}vm")
    _sub(meta, f"{_M}namespace", defn.owner.namespace)
    _sub(meta, f"{_M}name", defn.owner.name)
    _sub(meta, f"{_M}uid", defn.owner.uid)
    if definition_hash is not None:
        _sub(meta, f"{_M}definitionHash", definition_hash)

    kib = str(-(-defn.memory_bytes // 1024))
    _sub(root, "memory", kib, unit="KiB")
    _sub(root, "currentMemory", kib, unit="KiB")
    _sub(root, "vcpu", str(defn.vcpus))

    efi = defn.firmware == "uefi"
    os_el = _sub(root, "os", firmware="efi" if efi else None)
    machine = "q35" if efi and defn.type in ("kvm", "qemu") else None
    _sub(os_el, "type", "hvm", arch=defn.arch, machine=machine)
    if defn.type in ("kvm", "qemu"):
        features = _sub(root, "features")
        _sub(features, "acpi")
        _sub(features, "apic")
    if defn.type == "kvm":
        _sub(root, "cpu", mode="host-passthrough", check="none")
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    _sub(root, "on_crash", "destroy")

    devices = _sub(root, "devices")
    n_disk = n_cdrom = 0
    for disk in defn.disks:
        if disk.device == "cdrom":
            if efi:
                target, bus = _dev_name("sd", n_cdrom), "sata"
            else:
                if n_cdrom >= MAX_IDE_CDROMS:
                    raise DomainXMLError(f"at most {MAX_IDE_CDROMS} cdroms with bios firmware (IDE bus)")
                target, bus = _dev_name("hd", n_cdrom), "ide"
            n_cdrom += 1
        else:
            target, bus = _dev_name("vd", n_disk), "virtio"
            n_disk += 1
        el = _sub(devices, "disk", type="file", device=disk.device)
        _sub(el, "driver", name="qemu", type="raw" if disk.device == "cdrom" else disk.format)
        if disk.path is not None:
            _sub(el, "source", file=disk.path)
        _sub(el, "target", dev=target, bus=bus)
        if disk.device == "cdrom":
            _sub(el, "readonly")
        if disk.boot_order is not None:
            _sub(el, "boot", order=str(disk.boot_order))
        _sub(el, "alias", name=f"ua-disk-{disk.name}")

    for iface in defn.interfaces:
        el = _sub(devices, "interface", type=iface.type)
        if iface.mac:
            _sub(el, "mac", address=iface.mac.lower())
        if iface.type == "network":
            _sub(el, "source", network=iface.source or "")
        elif iface.type == "bridge":
            _sub(el, "source", bridge=iface.source or "")
        _sub(el, "model", type=iface.model)
        _sub(el, "alias", name=f"ua-net-{iface.name}")

    # Serial console on a pty, mirrored into a log file on the host so guest output is readable.
    serial = _sub(devices, "serial", type="pty")
    _sub(serial, "log", file=defn.serial_log_path, append="on")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    return root


def definition_hash(defn: DomainDefinition) -> str:
    """A short digest of everything in the definition: a changed digest means a redefine."""
    body = ET.tostring(_build(defn, None), encoding="unicode")
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def build_domain_xml(defn: DomainDefinition) -> str:
    """The domain XML, with our <metadata> (owner + definition hash)."""
    root = _build(defn, definition_hash(defn))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")


@dataclasses.dataclass(frozen=True)
class DomainMetadata:
    owner: Owner | None
    definition_hash: str | None


def parse_metadata(xml: str) -> DomainMetadata:
    """Our metadata from a domain XML (as libvirt returns it); empty when it is not ours."""
    root = ET.fromstring(xml)
    vm = root.find(f"./metadata/{_M}vm")
    if vm is None:
        return DomainMetadata(None, None)
    ns, name, uid = (vm.findtext(f"{_M}{k}") for k in ("namespace", "name", "uid"))
    owner = Owner(ns, name, uid) if ns and name and uid else None
    return DomainMetadata(owner, vm.findtext(f"{_M}definitionHash"))


def _by_alias(xml: str, devices: str, prefix: str, child: str, attribute: str) -> dict[str, str]:
    """Our device name (from its `<prefix><name>` alias) → an attribute of one of its child elements."""
    result: dict[str, str] = {}
    for device in ET.fromstring(xml).iterfind(devices):
        alias_el, value_el = device.find("alias"), device.find(child)
        alias = alias_el.get("name", "") if alias_el is not None else ""
        value = value_el.get(attribute) if value_el is not None else None
        if alias.startswith(prefix) and value:
            result[alias[len(prefix):]] = value
    return result


def interface_macs(xml: str) -> dict[str, str]:
    """Interface name (from our ua-net- alias) → MAC address, for status."""
    return _by_alias(xml, "./devices/interface", "ua-net-", "mac", "address")


def disk_devices(xml: str) -> dict[str, tuple[str, str, bool]]:
    """Disk name (from our ua-disk- alias) → (target dev, source file or "", read-only), every disk."""
    result: dict[str, tuple[str, str, bool]] = {}
    for disk in ET.fromstring(xml).iterfind("./devices/disk"):
        alias, target, source = disk.find("alias"), disk.find("target"), disk.find("source")
        name = alias.get("name", "") if alias is not None else ""
        if not name.startswith("ua-disk-") or target is None:
            continue
        readonly = disk.find("readonly") is not None or disk.get("device") == "cdrom"
        result[name[len("ua-disk-"):]] = (target.get("dev", ""), source.get("file", "") if source is not None else "",
                                         readonly)
    return result


def disk_sources(xml: str) -> dict[str, str]:
    """Disk name (from our ua-disk- alias) → source file, for device=disk only (cdroms are ISOImages')."""
    return _by_alias(xml, "./devices/disk[@device='disk']", "ua-disk-", "source", "file")

"""Simulated libvirt hosts for libvirt's built-in test driver: a ``<node>`` XML file opened as
``test:///abs/path.xml``. In-process, no daemon, calls take < 1 ms.

Facts verified with libvirt 9.0 / libvirt-python 12.8 (see ``tests/integration``):

- ``getInfo()`` returns ``[model, memory_mib, cpus, mhz, nodes, sockets, cores, threads]``
  straight from the file (``<memory>`` is in KiB, reported in MiB; ``cpus`` is ``<active>``;
  ``[0]`` is the file's ``<model>`` text, ``x86_64`` here), while the capabilities say
  ``i686`` whatever the file says.
- ``getCapabilities()`` is a fixed document: host arch ``i686``, secmodel ``testSecurity``,
  two guests (``hvm`` and ``xen``) that each offer **only** ``<domain type='test'/>`` — no
  ``qemu``/``kvm``. ``getDomainCapabilities()`` is not supported (VIR_ERR_NO_SUPPORT).
  Yet ``defineXML`` accepts any domain type (``qemu``, ``kvm``, ``test``).
- ``listAllStoragePools()`` returns the file's pools, active, autostart 0, with the
  ``<capacity>``/``<available>`` written here; volumes created on them live in memory only.
- ``getHostname()`` is the real machine's hostname, not the file's ``name``.
- ``getFreeMemory()`` returns 0; each ``open()`` gets a private copy of the file's state.
- Domains listed in the file are *running* unless they carry ``<test:runstate>5</...>``.
"""

from __future__ import annotations

import os
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_test_host"]

_TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
ET.register_namespace("test", _TEST_NS)


def _sub(parent: ET.Element, tag: str, text: Any = None, **attrs: str) -> ET.Element:
    child = ET.SubElement(parent, tag, attrs)
    if text is not None:
        child.text = str(text)
    return child


def _pool(node: ET.Element, name: str, path: Path, capacity_gib: int) -> None:
    pool = _sub(node, "pool", type="dir")
    _sub(pool, "name", name)
    _sub(pool, "uuid", uuid.uuid5(uuid.NAMESPACE_URL, str(path)))
    _sub(pool, "capacity", capacity_gib, unit="GiB")
    _sub(pool, "allocation", 0, unit="bytes")
    _sub(pool, "available", capacity_gib, unit="GiB")
    _sub(_sub(pool, "target"), "path", path)


def _network(node: ET.Element) -> None:
    net = _sub(node, "network")
    _sub(net, "name", "default")
    _sub(net, "bridge", name="virbr0")
    _sub(net, "forward", mode="nat")
    ip = _sub(net, "ip", address="192.168.122.1", netmask="255.255.255.0")
    _sub(_sub(ip, "dhcp"), "range", start="192.168.122.2", end="192.168.122.254")


def _domain(spec: str | Mapping[str, Any]) -> ET.Element:
    if isinstance(spec, str):
        return ET.fromstring(spec)
    memory_mib = int(spec.get("memory_mib", 128))
    dom = ET.Element("domain", type=str(spec.get("type", "test")))
    _sub(dom, "name", spec["name"])
    _sub(dom, "uuid", spec.get("uuid") or uuid.uuid4())
    _sub(dom, "memory", memory_mib, unit="MiB")
    _sub(dom, "currentMemory", memory_mib, unit="MiB")
    _sub(dom, "vcpu", int(spec.get("vcpus", 1)))
    _sub(_sub(dom, "os"), "type", "hvm", arch="x86_64")
    if spec.get("metadata_xml"):
        dom.append(ET.fromstring(f"<metadata>{spec['metadata_xml']}</metadata>"))
    if not spec.get("running", True):
        _sub(dom, f"{{{_TEST_NS}}}runstate", 5)  # 5 = VIR_DOMAIN_SHUTOFF
    return dom


def write_test_host(
    path: str | os.PathLike[str],
    *,
    name: str,
    cpus: int,
    memory_mib: int,
    pools: Sequence[str] = ("default",),
    domains: Iterable[str | Mapping[str, Any]] = (),
    network: bool = False,
    pool_root: str | os.PathLike[str] | None = None,
    pool_capacity_gib: int = 100,
    mhz: int = 2000,
) -> str:
    """Write a libvirt test-driver host file and return its ``test:///abs/path.xml`` URI.

    ``cpus`` and ``memory_mib`` are what ``getInfo()`` reports (``[1]`` = memory MiB,
    ``[2]`` = cpus). Each name in ``pools`` becomes an active dir pool whose target is
    ``<pool_root>/<name>`` (``pool_root`` defaults to ``<file stem>-pools`` beside the file;
    the directories are created, though the test driver never writes to them).
    ``network=True`` adds an active NAT network ``default``. ``domains`` are either raw
    ``<domain>`` XML strings or mappings with ``name`` and optional ``memory_mib`` (128),
    ``vcpus`` (1), ``type`` (``test``), ``running`` (True), ``uuid``, ``metadata_xml``.
    ``name`` is recorded in a comment only: the test driver has no host name of its own.
    """
    path = Path(path).resolve()
    if cpus < 1 or memory_mib < 1:
        raise ValueError("cpus and memory_mib must be positive")
    path.parent.mkdir(parents=True, exist_ok=True)
    root = Path(pool_root).resolve() if pool_root else path.parent / f"{path.stem}-pools"
    node = ET.Element("node")
    node.append(ET.Comment(f" libvirt-operator test host: {name.replace('--', '- -')} "))
    cpu = _sub(node, "cpu")
    for tag, value in (("mhz", mhz), ("model", "x86_64"), ("active", cpus), ("nodes", 1),
                       ("sockets", 1), ("cores", cpus), ("threads", 1)):
        _sub(cpu, tag, value)
    _sub(node, "memory", memory_mib * 1024)  # KiB
    for pool in pools:
        pool_path = root / pool
        pool_path.mkdir(parents=True, exist_ok=True)
        _pool(node, pool, pool_path, pool_capacity_gib)
    if network:
        _network(node)
    node.extend(_domain(d) for d in domains)
    ET.indent(node)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(ET.tostring(node, encoding="unicode") + "\n")
    os.replace(tmp, path)
    return f"test://{path}"

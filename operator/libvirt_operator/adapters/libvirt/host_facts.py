"""Read-only facts about a host, gathered in one blocking function (runs in the host's threads)."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET

import libvirt


@dataclasses.dataclass(frozen=True)
class HostFacts:
    hostname: str
    arch: str
    cpus: int
    memory_bytes: int
    hypervisor: str
    libvirt_version: str
    domain_types: tuple[str, ...]
    domains: int
    allocated_cpus: int
    allocated_memory_bytes: int


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def domain_types_from_capabilities(caps_xml: str) -> tuple[str, ...]:
    """Domain types the host can really run. libvirt lists kvm whenever /dev/kvm exists, even where
    the CPU lacks hardware virtualisation (a VM without nested virtualisation): on x86 kvm counts
    only when the host CPU shows vmx or svm."""
    root = ET.fromstring(caps_xml)
    found = {d.get("type") for d in root.iterfind("./guest/arch/domain") if d.get("type")}
    cpu = root.find("./host/cpu")
    if cpu is not None and (cpu.findtext("arch") or "") in ("x86_64", "i686"):
        features = {f.get("name") for f in cpu.iterfind("feature")}
        if not features & {"vmx", "svm"}:
            found.discard("kvm")
    order = ("kvm", "qemu", "test")
    return tuple(t for t in order if t in found)


def probe_host(conn: libvirt.virConnect) -> HostFacts:
    model, memory_mib, cpus, *_ = conn.getInfo()
    caps = conn.getCapabilities()
    arch = ET.fromstring(caps).findtext("./host/cpu/arch") or model
    allocated_cpus = allocated_mem = 0
    domains = conn.listAllDomains()
    for dom in domains:
        # info(): state, maxMem KiB, mem KiB, vcpus, cpuTime — one call per domain but all from the
        # daemon's memory; only running domains consume host resources.
        state, max_kib, _mem_kib, vcpus, _ = dom.info()
        if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_BLOCKED):
            allocated_cpus += vcpus
            allocated_mem += max_kib * 1024
    return HostFacts(
        hostname=conn.getHostname(),
        arch=arch,
        cpus=cpus,
        memory_bytes=memory_mib * 1024 * 1024,
        hypervisor=f"{conn.getType()} {_version(conn.getVersion())}",
        libvirt_version=_version(conn.getLibVersion()),
        domain_types=domain_types_from_capabilities(caps),
        domains=len(domains),
        allocated_cpus=allocated_cpus,
        allocated_memory_bytes=allocated_mem,
    )

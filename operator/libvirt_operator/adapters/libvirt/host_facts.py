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


# Only running (or paused/blocked) domains consume host resources.
_ACTIVE = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_BLOCKED)
_STATS = libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_VCPU | libvirt.VIR_DOMAIN_STATS_BALLOON
_GONE = (libvirt.VIR_ERR_NO_DOMAIN,)


@dataclasses.dataclass(frozen=True)
class DomainUsage:
    domains: int
    cpus: int
    memory_bytes: int


def domain_usage(conn: libvirt.virConnect) -> DomainUsage:
    """How many domains the host has and what its running ones use, in ONE bulk call
    (getAllDomainStats: state, vcpu and balloon groups, all from the daemon's memory).

    Domains come and go while we look (VMs are created and deleted all the time): a domain that
    vanishes between the listing and a per-domain call is simply no longer there, never a failed
    probe. The per-domain fallback (info()) only runs for drivers that do not report the vcpu or
    balloon groups (libvirt's test driver), and tolerates VIR_ERR_NO_DOMAIN."""
    count = cpus = memory = 0
    # NOWAIT: a domain busy in a job (a start, a destroy) is reported from the daemon's memory instead of
    # making the probe wait for that job (up to 30 s each: during a burst of starts the probe timed out).
    for dom, stats in conn.getAllDomainStats(_STATS, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT):
        state = stats.get("state.state")
        vcpus, max_kib = stats.get("vcpu.current"), stats.get("balloon.maximum")
        if state is None or ((vcpus is None or max_kib is None) and state in _ACTIVE):
            try:
                state, max_kib, _mem_kib, vcpus, _ = dom.info()
            except libvirt.libvirtError as err:
                if err.get_error_code() in _GONE:
                    continue  # undefined since the listing: it neither counts nor consumes anything
                raise
        count += 1
        if state in _ACTIVE:
            cpus += int(vcpus)
            memory += int(max_kib) * 1024
    return DomainUsage(count, cpus, memory)


def probe_host(conn: libvirt.virConnect) -> HostFacts:
    model, memory_mib, cpus, *_ = conn.getInfo()
    caps = conn.getCapabilities()
    arch = ET.fromstring(caps).findtext("./host/cpu/arch") or model
    usage = domain_usage(conn)
    return HostFacts(
        hostname=conn.getHostname(),
        arch=arch,
        cpus=cpus,
        memory_bytes=memory_mib * 1024 * 1024,
        hypervisor=f"{conn.getType()} {_version(conn.getVersion())}",
        libvirt_version=_version(conn.getLibVersion()),
        domain_types=domain_types_from_capabilities(caps),
        domains=usage.domains,
        allocated_cpus=usage.cpus,
        allocated_memory_bytes=usage.memory_bytes,
    )

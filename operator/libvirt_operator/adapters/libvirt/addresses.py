"""The IP addresses of one running domain (blocking; runs in the host's threads via
``HostConnection.call``).

Sources are asked in the order of trust (core.addresses.TRUST_ORDER) and only as far as needed:
the guest agent when the domain has an agent channel whose agent is connected (libvirt shows
``state='connected'``; an absent or silent agent would otherwise cost a timeout), then the DHCP
leases of libvirt networks (only when an interface is on one), then the host's ARP table, which
is asked only for the MACs still without an address."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import libvirt

from ...core.addresses import AddressObservation, ReportedAddress, Source, SourceReport
from .domain_xml import interface_macs
from .errors import CONNECTION_LOST

AGENT_CHANNEL = "org.qemu.guest_agent.0"
_FLAGS: dict[Source, int] = {
    "agent": libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
    "lease": libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
    "arp": libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP,
}
_FAMILY = {libvirt.VIR_IP_ADDR_TYPE_IPV4: "IPv4", libvirt.VIR_IP_ADDR_TYPE_IPV6: "IPv6"}
_NO_MAC = "00:00:00:00:00:00"  # the agent's loopback


def _parse(raw: dict[str, dict] | None) -> dict[str, tuple[ReportedAddress, ...]]:
    by_mac: dict[str, list[ReportedAddress]] = {}
    for info in (raw or {}).values():
        mac = str(info.get("hwaddr") or "").lower()
        if not mac or mac == _NO_MAC:
            continue
        for a in info.get("addrs") or []:
            family = _FAMILY.get(a.get("type"))
            if family is None or not a.get("addr"):
                continue
            prefix = a.get("prefix")
            found = ReportedAddress(str(a["addr"]), int(prefix) if prefix is not None else None, family)  # type: ignore[arg-type]
            if found not in by_mac.setdefault(mac, []):
                by_mac[mac].append(found)
    return {mac: tuple(addrs) for mac, addrs in by_mac.items() if addrs}


def _alive(conn: libvirt.virConnect) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def sources_to_ask(domain_xml: str) -> tuple[tuple[Source, ...], set[str]]:
    """Which sources can know this domain's addresses, and the MACs of its interfaces."""
    root = ET.fromstring(domain_xml)
    macs = {m.get("address", "").lower() for m in root.iterfind("./devices/interface/mac") if m.get("address")}
    agent = any(t.get("name") == AGENT_CHANNEL and t.get("state") == "connected"
                for t in root.iterfind("./devices/channel/target"))
    on_network = root.find("./devices/interface[@type='network']") is not None
    sources: list[Source] = []
    if agent:
        sources.append("agent")
    if on_network:
        sources.append("lease")
    sources.append("arp")
    return tuple(sources), macs


def interface_addresses(conn: libvirt.virConnect, uuid: str) -> AddressObservation | None:
    """Ask the sources for a running domain's addresses; None when it is not running (or gone).
    A source that fails is recorded with its error and the next one is asked."""
    try:
        dom = conn.lookupByUUIDString(uuid)
        if not dom.isActive():
            return None
        xml = dom.XMLDesc(0)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise
    sources, macs = sources_to_ask(xml)
    reports: list[SourceReport] = []
    missing = set(macs)
    for source in sources:
        if not missing:
            break  # every interface has addresses from a more exact source (or there is none)
        try:
            by_mac = _parse(dom.interfaceAddresses(_FLAGS[source], 0))
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            if err.get_error_code() in CONNECTION_LOST and not _alive(conn):
                raise  # the connection layer's to handle (reopen and retry)
            reports.append(SourceReport(source, {}, str(err.get_error_message() or err)))
            continue
        reports.append(SourceReport(source, by_mac))
        missing -= set(by_mac)
    return AddressObservation(tuple(reports), interface_macs(xml))

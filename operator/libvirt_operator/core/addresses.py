"""Guest IP addresses as libvirt reports them, as plain data (no libvirt here).

adapters.libvirt.addresses fills these from virDomainInterfaceAddresses; reconcile.addresses
turns them into status.interfaces."""

from __future__ import annotations

import dataclasses
from typing import Literal

Source = Literal["agent", "lease", "arp"]
# Most exact first: the guest itself (agent), the DHCP server of a libvirt network (lease), the
# host's neighbour table (arp: only addresses the host has talked to, possibly stale).
TRUST_ORDER: tuple[Source, ...] = ("agent", "lease", "arp")


@dataclasses.dataclass(frozen=True)
class ReportedAddress:
    address: str
    prefix: int | None
    family: Literal["IPv4", "IPv6"]


@dataclasses.dataclass(frozen=True)
class SourceReport:
    """One source's answer: addresses by (lower-case) MAC, or why it could not answer."""

    source: Source
    by_mac: dict[str, tuple[ReportedAddress, ...]]
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class AddressObservation:
    """What the sources said about one running domain, in the order they were asked, and the MACs
    of its interfaces by our interface name (from the live definition)."""

    reports: tuple[SourceReport, ...]
    macs: dict[str, str] = dataclasses.field(default_factory=dict)

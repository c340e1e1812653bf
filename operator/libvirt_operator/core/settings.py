"""Operator settings, from the command line and LIBVIRT_OPERATOR_* environment variables."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Settings:
    libvirt_call_timeout: float = 60.0
    connect_timeout: float = 20.0
    # Destinations ISO downloads may never reach unless explicitly allowed (SSRF guard).
    download_denied_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default_factory=lambda: tuple(ipaddress.ip_network(n) for n in (
            "169.254.0.0/16", "fe80::/10", "100.100.100.200/32", "fd00:ec2::254/128")))
    download_allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    remediation_base_url: str = "https://github.com/libvirt-operator/libvirt-operator/blob/main/rag"
    knowledge_base_enabled: bool = True

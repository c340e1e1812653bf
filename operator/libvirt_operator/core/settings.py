"""Operator settings, from the command line and LIBVIRT_OPERATOR_* environment variables."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Settings:
    libvirt_call_timeout: float = 60.0
    connect_timeout: float = 20.0
    # Destinations ISO downloads may never reach unless explicitly allowed (SSRF guard): link-local
    # (cloud metadata at 169.254.169.254), Alibaba's and AWS' IPv6 metadata, loopback (the operator's
    # own pod: metrics, liveness, sidecars; the node's services with hostNetwork) and "this host"
    # (0.0.0.0/8, ::). Private ranges (10/8, 172.16/12, 192.168/16) stay reachable: internal mirrors
    # are the common case. An allowed network wins over a denied one (tests allow 127.0.0.0/8).
    download_denied_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default_factory=lambda: tuple(ipaddress.ip_network(n) for n in (
            "169.254.0.0/16", "fe80::/10", "100.100.100.200/32", "fd00:ec2::254/128",
            "127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128")))
    download_allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    download_connect_timeout: float = 15.0
    download_read_timeout: float = 60.0  # longest silence from the server mid-body
    download_max_redirects: int = 5
    download_attempts: int = 3  # tries inside one import (resuming with Range) before backing off
    # ISO images are downloaded once here, then uploaded to each host; removed after the uploads.
    iso_cache_dir: str = field(default_factory=lambda: os.environ.get(
        "LIBVIRT_OPERATOR_ISO_CACHE_DIR", "/var/cache/libvirt-operator/iso"))
    iso_retry_limit: int = 5  # failed imports before Stalled=True (retries continue, backoff capped)
    iso_resync_seconds: float = 30.0  # a Ready ISOImage re-checks its target hosts and volumes this often
    remediation_base_url: str = "https://github.com/libvirt-operator/libvirt-operator/blob/main/rag"
    knowledge_base_enabled: bool = True
    rag_db_dir: str | None = None  # None: LIBVIRT_OPERATOR_RAG_DB or ~/.cache/libvirt-operator/rag-db

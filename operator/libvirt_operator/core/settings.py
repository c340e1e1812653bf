"""Operator settings, from the command line and LIBVIRT_OPERATOR_* environment variables."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Settings:
    libvirt_call_timeout: float = 60.0
    connect_timeout: float = 20.0
    # SSRF guard (adapters/http/download.py): downloads reach only public unicast addresses; every
    # special-purpose range (loopback, private, CGNAT, link-local, ULA, NAT64/IPv4-mapped forms of
    # those, 6to4, Teredo, multicast, documentation, reserved, ...) is refused unless an allowed
    # network covers it. Between allowed and denied networks the most specific one wins (a tie goes
    # to allowed), so the explicit denies below keep the cloud metadata endpoints closed even when a
    # wider network (169.254.0.0/16, 100.64.0.0/10, fc00::/7, 0.0.0.0/0) is allowed, and loopback and
    # "this host" stay closed under an allow of 0.0.0.0/0 or ::/0. Tests and the embedded default
    # allow 127.0.0.0/8 (that exact network: it ties with the deny below, and allowed wins).
    download_denied_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default_factory=lambda: tuple(ipaddress.ip_network(n) for n in (
            "169.254.169.254/32", "169.254.170.2/32", "169.254.170.23/32",  # AWS/GCP/Azure/OpenStack, ECS, EKS
            "100.100.100.200/32", "fd00:ec2::254/128", "fd00:ec2::23/128",  # Alibaba, AWS IPv6
            "169.254.0.0/16", "fe80::/10", "127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128")))
    download_allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # The largest image a download may bring (an ISOImage's spec.maxSize can only lower it); the
    # body is cut there whatever Content-Length says. 0: no operator-wide cap.
    download_max_bytes: int = 16 * 2**30
    # Imports (download + uploads) running at once, operator-wide; the others wait for a slot.
    iso_max_concurrent_imports: int = 4
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
    # libvirt's test driver (test:// URIs) reads host files from the operator's own filesystem: off
    # unless --allow-test-driver (dev launcher, tests); files only under these directories.
    allow_test_driver: bool = False
    test_driver_dirs: tuple[str, ...] = ()
    # The console API (handlers/console_api.py), the backend of an APIService: off (None) unless
    # --console-port; 0 picks a free port (tests). Without cert files a self-signed cert for
    # console_service_names is generated at start.
    console_port: int | None = None
    console_address: str = "0.0.0.0"
    console_cert_file: str | None = None
    console_key_file: str | None = None
    console_service_names: tuple[str, ...] = ()

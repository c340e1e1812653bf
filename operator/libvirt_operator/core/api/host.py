"""LibvirtHost: a libvirt daemon the operator manages domains on (cluster-scoped)."""

from __future__ import annotations

import datetime as dt
from typing import ClassVar, Literal

from pydantic import Field

from .common import (
    ApiModel, Condition, ErrorStatus, PrinterColumn, Resource, ResourceInfo, SecretReference,
    age_column, conditions_field, observed_generation_field, ready_column, reason_column,
)

URI_PATTERN = r"^(qemu(\+(ssh|libssh|libssh2|tls|tcp|unix))?|test)://[^\s]*$"
DomainType = Literal["kvm", "qemu", "test"]


class LibvirtHostSpec(ApiModel):
    """How to reach a libvirt host and how hard the operator may drive it."""

    uri: str = Field(
        description=("libvirt connection URI, e.g. qemu+ssh://root@host/system, qemu+tls://host/system, "
                     "qemu:///system (the operator's own node) or test:///default (libvirt's test driver)."),
        pattern=URI_PATTERN, max_length=2048)
    credentials_secret_ref: SecretReference | None = Field(
        default=None,
        description=("Secret with credentials. qemu+ssh: keys `ssh-privatekey` and `known_hosts`. "
                     "qemu+tls: keys `tls.crt`, `tls.key` and `ca.crt`."))
    insecure: bool = Field(
        default=False,
        description="Allow qemu+tcp:// (no authentication, no encryption). Only for lab hosts.")
    default_pool: str = Field(
        default="default", min_length=1, max_length=253,
        description="Storage pool for new volumes and imported ISO images unless a resource names another.")
    max_concurrent_calls: int = Field(
        default=4, ge=1, le=64,
        description="At most this many blocking libvirt calls run against this host at once.")
    probe_interval_seconds: int = Field(
        default=30, ge=5, le=3600,
        description="How often the operator probes the host and resynchronises its domains.")


class HostResources(ApiModel):
    """CPU and memory amounts."""

    cpus: int = Field(description="Logical CPUs.", ge=0)
    memory: str = Field(description="Memory as a Kubernetes quantity, e.g. 16Gi.")


class OrphanedDomain(ApiModel):
    """A domain created by the operator whose VirtualMachine no longer exists (never deleted automatically)."""

    uuid: str = Field(description="Domain UUID (the deleted VirtualMachine's uid).")
    namespace: str = Field(description="Namespace of the VirtualMachine that created it.")
    name: str = Field(description="Name of the VirtualMachine that created it.")


class LibvirtHostStatus(ApiModel):
    """What the last probe saw."""

    observed_generation: int | None = observed_generation_field()
    conditions: list[Condition] = conditions_field()
    hostname: str | None = Field(default=None, description="Host name reported by libvirt.")
    arch: str | None = Field(default=None, description="CPU architecture, e.g. x86_64.")
    hypervisor: str | None = Field(default=None, description="Hypervisor driver and version, e.g. QEMU 7.2.0.")
    libvirt_version: str | None = Field(default=None, description="libvirt version of the daemon.")
    domain_types: list[DomainType] = Field(
        default_factory=list,
        description="Domain types the host offers: kvm when hardware virtualisation is usable, qemu (TCG emulation), test (libvirt test driver).")
    capacity: HostResources | None = Field(default=None, description="Total CPUs and memory of the host.")
    allocated: HostResources | None = Field(
        default=None, description="CPUs and memory used by the host's running domains.")
    domains: int | None = Field(default=None, ge=0, description="Number of domains defined on the host.")
    last_probe_time: dt.datetime | None = Field(default=None, description="When the host was last probed.")
    orphaned_domains: list[OrphanedDomain] = Field(
        default_factory=list,
        description=("Domains this operator created whose VirtualMachine is gone (e.g. deleted while the "
                     "operator was down with its finalizer removed). Inspect, then `virsh undefine` them."))
    error: ErrorStatus | None = Field(default=None, description="The last failure, if the host is not Ready.")


class LibvirtHost(Resource):
    """A libvirt host reached by URI; VirtualMachines and ISOImages are placed on such hosts."""

    info: ClassVar[ResourceInfo] = ResourceInfo(
        kind="LibvirtHost", plural="libvirthosts", singular="libvirthost", short_names=("lvh",),
        namespaced=False,
        description="A libvirt host reached by URI. The operator probes it and places VMs on it.",
        printer_columns=(
            PrinterColumn("URI", ".spec.uri", description="libvirt connection URI."),
            ready_column(),
            PrinterColumn("CPUs", ".status.capacity.cpus", type="integer"),
            PrinterColumn("Memory", ".status.capacity.memory"),
            PrinterColumn("Domains", ".status.domains", type="integer"),
            reason_column(),
            age_column(),
        ),
    )
    spec_validations: ClassVar[list[dict[str, str]]] = [
        {"rule": "!self.uri.startsWith('qemu+tcp://') || self.insecure",
         "message": "qemu+tcp:// is unauthenticated and unencrypted: set insecure: true to allow it, "
                    "or use qemu+tls:// or qemu+ssh://"},
    ]

    spec: LibvirtHostSpec = Field(description="How to reach the host.")
    status: LibvirtHostStatus | None = Field(default=None, description="Observed state of the host.")

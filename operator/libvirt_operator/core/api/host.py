"""LibvirtHost: a libvirt daemon the operator manages domains on (cluster-scoped)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Annotated, ClassVar, Literal

from pydantic import ConfigDict, Field

from ..labels import labels_match, requirement_holds
from .common import (
    ApiModel, Condition, ErrorStatus, PrinterColumn, Resource, ResourceInfo, SecretReference,
    age_column, conditions_field, observed_generation_field, ready_column, reason_column,
)
from .common import NAMESPACE_PATTERN

URI_PATTERN = r"^(qemu(\+(ssh|libssh|libssh2|tls|tcp|unix))?|test)://[^\s]*$"
_PARAM_RE = "mode=(auto|legacy)|proxy=(auto|netcat|native)"  # core/hosturi.py ALLOWED_PARAMS
DomainType = Literal["kvm", "qemu", "test"]


LABEL_KEY_MAX = 317  # [prefix (DNS subdomain, 253) /] name (63)
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
RESOURCE_NAME_PATTERN = r"^[^/\s]+$"  # a libvirt pool, network or bridge name
MAX_TENANCY_ENTRIES = 256
_SET = {"x-kubernetes-list-type": "set"}


class LabelSelectorRequirement(ApiModel):
    """One requirement of a label selector (metav1.LabelSelectorRequirement)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "self.operator in ['In', 'NotIn'] ? size(self.values) > 0 : size(self.values) == 0",
         "message": "In and NotIn need values; Exists and DoesNotExist take none"},
    ]})

    key: str = Field(description="The label key the requirement applies to.", min_length=1,
                     max_length=LABEL_KEY_MAX)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="In, NotIn, Exists or DoesNotExist.")
    values: list[Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]] = Field(
        default_factory=list, max_length=64,
        description="Values for In and NotIn (non-empty); empty for Exists and DoesNotExist.")


class LabelSelector(ApiModel):
    """A label query (metav1.LabelSelector): matchLabels and matchExpressions are ANDed. An empty
    selector matches everything."""

    match_labels: dict[Annotated[str, Field(max_length=LABEL_KEY_MAX)],
                       Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]] = Field(
        default_factory=dict, max_length=32, description="Labels that must all be present with these values.")
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, max_length=32, description="Requirements that must all hold.")

    def matches(self, labels: Mapping[str, str]) -> bool:
        return labels_match(self.match_labels, labels) and all(
            requirement_holds(req.key, req.operator, req.values, labels) for req in self.match_expressions)


class LibvirtHostSpec(ApiModel):
    """How to reach a libvirt host and how hard the operator may drive it."""

    uri: str = Field(
        description=("libvirt connection URI, e.g. qemu+ssh://root@host/system, qemu+tls://host/system, "
                     "qemu:///system (the operator's own node) or test:///default (libvirt's test driver, "
                     "only on an operator started with --allow-test-driver). Query parameters: only mode and "
                     "proxy; keys, known_hosts and certificates come from credentialsSecretRef."),
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
        default=16, ge=1, le=64,
        description=("At most this many blocking libvirt calls run against this host at once. libvirtd serves at "
                     "most max_client_requests (default 5) requests of one client connection at once, so the "
                     "calls are spread over one connection per 4 of them; they take at most this many of the "
                     "daemon's max_workers (default 20): lower it on a host other management clients share."))
    probe_interval_seconds: int = Field(
        default=30, ge=5, le=3600,
        description="How often the operator probes the host and resynchronises its domains.")
    # --- day two: cordon, fencing, shared storage ---
    unschedulable: bool = Field(
        default=False,
        description=("Cordon: no VirtualMachine is placed here any more (hostSelector skips it, a hostRef waits). "
                     "VMs already here keep running."))
    out_of_service: bool = Field(
        default=False,
        description=("Fence declaration, set by an admin or a fencing agent once the host is known to run no "
                     "domain (powered off, or isolated from storage and network), like Kubernetes' "
                     "node.kubernetes.io/out-of-service taint. Nothing is placed here; VMs with hostFailurePolicy "
                     "Recreate leave for another host. The operator cannot tell a dead host from an unreachable "
                     "one, so it never moves a VM on unreachability alone. Clear it once the host is back and "
                     "its stale copies are gone (the VMs' status.staleDomainHosts no longer name it)."))
    shared_pools: list[Annotated[str, Field(max_length=253, pattern=RESOURCE_NAME_PATTERN)]] = Field(
        default_factory=list, max_length=MAX_TENANCY_ENTRIES, json_schema_extra=_SET,
        description=("Storage pools whose storage other hosts see too, under the same pool name (NFS, a cluster "
                     "filesystem, Ceph RBD, iSCSI): a VM's volume in such a pool is the same volume from every "
                     "host that lists the pool. A VM with hostFailurePolicy Recreate follows its disks only to "
                     "hosts that list all of its volume pools here."))
    # --- overcommit: how much of the host placement may promise (OpenStack's current defaults) ---
    cpu_allocation_ratio: float = Field(
        default=4.0, ge=1.0, le=64.0,
        description=("Virtual CPUs placement may promise per host CPU (hostSelector placement only; a hostRef pin "
                     "is never refused for capacity). Default 4.0, OpenStack's initial_cpu_allocation_ratio; "
                     "1.0 means no CPU overcommit."))
    memory_allocation_ratio: float = Field(
        default=1.0, ge=0.5, le=4.0,
        description=("Guest memory placement may promise per byte of host memory. Default 1.0 (no memory "
                     "overcommit, OpenStack's initial_ram_allocation_ratio); below 1.0 keeps headroom for the host."))
    # --- tenancy: who may use this host, and what it exposes to them ---
    allowed_namespaces: list[Annotated[str, Field(max_length=63, pattern=NAMESPACE_PATTERN)]] | None = Field(
        default=None, max_length=MAX_TENANCY_ENTRIES, json_schema_extra=_SET,
        description=("Namespaces whose VirtualMachines and ISOImages may use this host. A namespace is admitted "
                     "when it is listed here OR its labels match namespaceSelector. When neither field is set, "
                     "every namespace is admitted (the behaviour before these fields existed, so upgrades keep "
                     "working); set either one to restrict the host. An empty list admits no namespace by name. "
                     "A VM of a namespace that is not admitted is not placed here (hostRef: Scheduled=False, "
                     "reason NamespaceNotAllowed; hostSelector: the host is skipped). A VM already placed here "
                     "whose namespace stops being admitted is never defined, redefined or started again, but a "
                     "running domain is not stopped: its Ready condition says NamespaceNotAllowed."))
    namespace_selector: LabelSelector | None = Field(
        default=None,
        description=("Admit the namespaces whose labels match this selector (in addition to allowedNamespaces). "
                     "An empty selector ({}) admits every namespace. Label changes take effect at the next "
                     "reconcile (within seconds)."))
    allowed_pools: list[Annotated[str, Field(max_length=253, pattern=RESOURCE_NAME_PATTERN)]] | None = Field(
        default=None, max_length=MAX_TENANCY_ENTRIES, json_schema_extra=_SET,
        description=("Storage pools VM volumes and ISOImages may use on this host. Unset: any pool (the behaviour "
                     "before this field existed). Set: only these, plus defaultPool, which is always allowed "
                     "(it is where volumes and images go unless a resource names a pool). A VM asking for "
                     "another pool is refused with reason PoolNotAllowed and nothing is created."))
    allowed_networks: list[Annotated[str, Field(max_length=253, pattern=RESOURCE_NAME_PATTERN)]] | None = Field(
        default=None, max_length=MAX_TENANCY_ENTRIES, json_schema_extra=_SET,
        description=("libvirt networks that interfaces of type network may join on this host. Unset: any "
                     "network. Set: only these (an empty list: none); others are refused with reason "
                     "NetworkNotAllowed. Interfaces of type user are always allowed."))
    allowed_bridges: list[Annotated[str, Field(max_length=15, pattern=RESOURCE_NAME_PATTERN)]] | None = Field(
        default=None, max_length=MAX_TENANCY_ENTRIES, json_schema_extra=_SET,
        description=("Host bridges that interfaces of type bridge may attach to on this host. Unset: any bridge. "
                     "Set: only these (an empty list: none); others are refused with reason NetworkNotAllowed."))


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
        # The URI may not name files, sockets or programs nor weaken verification (core/hosturi.py
        # repeats these checks at reconcile, plus the operator's --allow-test-driver setting).
        {"rule": r"self.uri.matches(r'^[-A-Za-z0-9._~:/?&=@+\[\]]*$')",
         "message": "the URI may contain only letters, digits and - . _ ~ : / ? & = @ + [ ] "
                    "(no whitespace, fragments, percent-encoding or ';')"},
        {"rule": r"!self.uri.matches(r'^[a-z0-9+]+://[^/?@]*:[^/?@]*@')",
         "message": "the URI may not carry a password (user:password@): use credentialsSecretRef"},
        {"rule": "!self.uri.contains('?') || self.uri.matches(r'^[^?]*[?](" + _PARAM_RE + ")(&(" + _PARAM_RE
                 + "))*$')",
         "message": "only the query parameters mode (auto|legacy) and proxy (auto|netcat|native) are "
                    "allowed: keyfile, known_hosts, pkipath, command, socket, no_verify and the like are set "
                    "by the operator from credentialsSecretRef"},
        {"rule": r"!self.uri.startsWith('qemu') || self.uri.matches(r'^qemu(\+[a-z0-9]+)?://[^/?]*/(system|session)([?].*)?$')",
         "message": "qemu URIs end in /system or /session (optionally followed by ?mode=…&proxy=…)"},
        {"rule": r"!self.uri.startsWith('test:') || (self.uri.matches(r'^test:///(default|[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*\.xml)$') && !self.uri.matches(r'/[.][.]?(/|$)'))",
         "message": "test:// URIs are test:///default or test:///abs/path.xml (no host, query, '.' or '..'), "
                    "and need an operator started with --allow-test-driver"},
    ]

    spec: LibvirtHostSpec = Field(description="How to reach the host.")
    status: LibvirtHostStatus | None = Field(default=None, description="Observed state of the host.")

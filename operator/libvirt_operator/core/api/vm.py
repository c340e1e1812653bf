"""VirtualMachine: a libvirt domain on one of the LibvirtHosts, following its spec."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, ClassVar, Literal

from pydantic import ConfigDict, Field

from ..quantity import QUANTITY_PATTERN
from .cloudinit import CloudInit
from .image_source import CloneMode, DiskImageSource
from .common import (
    OBJECT_NAME_PATTERN, ApiModel, Condition, ErrorStatus, LocalObjectReference, PrinterColumn, Resource,
    ResourceInfo, age_column, conditions_field, observed_generation_field, quantity_rules, ready_column,
    reason_column,
)

RunStrategy = Literal["Always", "Halted", "Manual", "RerunOnFailure", "Once"]
PrintableStatus = Literal[
    "Stopped", "Provisioning", "Starting", "Running", "Paused", "Stopping", "Terminating",
    "CrashLoopBackOff", "ErrorUnschedulable", "WaitingForMedia", "Unknown",
]
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# Limits on what a VM may ask for (the CRD enforces them before anything reaches a host).
MAX_DISKS = 32
MAX_INTERFACES = 16
MAX_CPUS = 512
MIN_MEMORY, MAX_MEMORY = "16Mi", "16Ti"
MIN_VOLUME_SIZE, MAX_VOLUME_SIZE = "1Mi", "64Ti"


class HostSelector(ApiModel):
    """Label selector over LibvirtHosts."""

    match_labels: dict[Annotated[str, Field(max_length=317)],
                       Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]] = Field(
        default_factory=dict, max_length=16, description="Hosts must carry all of these labels.")


class VolumeSource(ApiModel):
    """A new qcow2 volume created (and deleted) by the operator: empty, or from a base image (source)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        *quantity_rules("size", MIN_VOLUME_SIZE, MAX_VOLUME_SIZE),
        {"rule": "has(self.size) || has(self.source)", "message": "a volume needs a size unless it has a source"},
        {"rule": "!has(self.clone) || has(self.source)", "message": "clone applies only to a volume with a source"},
    ]})

    size: str | None = Field(default=None, pattern=QUANTITY_PATTERN, max_length=32, description=(
        f"Volume size as a quantity, e.g. 10Gi ({MIN_VOLUME_SIZE} to {MAX_VOLUME_SIZE}). With a source: "
        "defaults to the base's size, and may only grow it (never shrink: VOLUME_SHRINK_REFUSED)."))
    pool: str | None = Field(default=None, max_length=253,
                             description="Storage pool; defaults to the host's defaultPool.")
    source: DiskImageSource | None = Field(default=None, description=(
        "Start from an existing volume (a base image) instead of an empty disk. The base is never modified."))
    clone: CloneMode | None = Field(default=None, description=(
        "backing (default): a qcow2 overlay whose backing file is the base (fast, thin; the base must stay "
        "in place while the VM exists). full: an independent qcow2 copy of the base."))


class CdromSource(ApiModel):
    """A read-only cdrom backed by an ISOImage's volume on the VM's host."""

    iso_image_ref: LocalObjectReference = Field(description="The ISOImage in the VM's namespace.")


class Disk(ApiModel):
    """A disk of the VM: exactly one of volume or cdrom."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "has(self.volume) != has(self.cdrom)", "message": "each disk needs exactly one of volume or cdrom"},
    ]})

    name: str = Field(description="Disk name, unique within the VM.", pattern=NAME_PATTERN, max_length=40)
    boot_order: int | None = Field(default=None, ge=1, le=64,
                                   description="Boot priority, 1 first. Disks without one are not bootable.")
    volume: VolumeSource | None = Field(default=None, description="A new empty qcow2 volume.")
    cdrom: CdromSource | None = Field(default=None, description="Install media from an ISOImage.")


class Interface(ApiModel):
    """A network interface."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "self.type == 'user' || has(self.source)",
         "message": "interfaces of type network or bridge need a source"},
        {"rule": "self.type != 'bridge' || !has(self.source) || self.source.size() <= 15",
         "message": "a bridge name is at most 15 characters"},
        {"rule": "!has(self.macAddress) || self.macAddress.matches('^.[02468aAcCeE]')",
         "message": "macAddress must be a unicast address (lowest bit of the first octet clear)"},
    ]})

    name: str = Field(description="Interface name, unique within the VM.", pattern=NAME_PATTERN, max_length=40)
    type: Literal["user", "network", "bridge"] = Field(
        default="user", description="user: QEMU user-mode NAT; network: a libvirt network; bridge: a host bridge.")
    source: str | None = Field(default=None, min_length=1, max_length=253, pattern=r"^[^/\s]+$",
                               description="The libvirt network name (type network) or bridge name (type bridge).")
    model: Literal["virtio", "e1000", "rtl8139"] = Field(default="virtio", description="Emulated NIC model.")
    mac_address: str | None = Field(default=None, pattern=r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$", max_length=17,
                                    description="Fixed MAC address; generated by libvirt when empty.")


class VirtualMachineSpec(ApiModel):
    """The desired VM. Placement is decided once and recorded in status.host."""

    host_ref: str | None = Field(default=None, max_length=253, pattern=OBJECT_NAME_PATTERN,
                                 description=("Name of the LibvirtHost to run on. Immutable. The host must be "
                                              "Ready; its free capacity is not checked (an explicit pin)."))
    host_selector: HostSelector | None = Field(
        default=None, description="Pick a Ready host with these labels and enough free capacity.")
    cpu: int = Field(default=1, ge=1, le=MAX_CPUS, description=f"Virtual CPUs (1 to {MAX_CPUS}).")
    memory: str = Field(default="512Mi", pattern=QUANTITY_PATTERN, max_length=32,
                        description=f"Guest memory, e.g. 2Gi ({MIN_MEMORY} to {MAX_MEMORY}).")
    run_strategy: RunStrategy = Field(
        default="Always",
        description=("Always: keep running, restart whenever it stops. Halted: keep stopped. "
                     "Manual: start once, then leave power state to the user. RerunOnFailure: restart "
                     "after a failure (with backoff), not after a clean guest shutdown. Once: run until "
                     "the guest stops, never restart."))
    domain_type: Literal["auto", "kvm", "qemu"] = Field(
        default="auto", description="auto: kvm when the host offers it, else qemu (TCG emulation).")
    firmware: Literal["bios", "uefi"] = Field(default="bios", description="Guest firmware.")
    disks: list[Disk] = Field(default_factory=list, max_length=MAX_DISKS,
                              description=f"Disks, in order (at most {MAX_DISKS}, names unique).", json_schema_extra={
                                  "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                                  "x-kubernetes-validations": [{
                                      "rule": "self.all(d, !has(d.bootOrder) || self.exists_one(e, "
                                              "has(e.bootOrder) && e.bootOrder == d.bootOrder))",
                                      "message": "bootOrder values must be unique across disks"}]})
    interfaces: list[Interface] = Field(
        default_factory=list, max_length=MAX_INTERFACES,
        description=f"Network interfaces (at most {MAX_INTERFACES}, names unique).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                           "x-kubernetes-validations": [{
                               "rule": "self.all(i, !has(i.macAddress) || self.exists_one(j, has(j.macAddress) "
                                       "&& j.macAddress.lowerAscii() == i.macAddress.lowerAscii()))",
                               "message": "macAddress values must be unique across interfaces"}]})
    termination_grace_period_seconds: int = Field(
        default=60, ge=0, le=3600,
        description=("When the VM must stop (runStrategy Halted), the guest is asked to shut down (ACPI) and "
                     "is powered off after this many seconds. Deletion powers off immediately."))
    cloud_init: CloudInit | None = Field(default=None, description=(
        "cloud-init NoCloud seed, attached as a read-only cdrom labelled cidata (built by the operator)."))
    install_media_policy: Literal["Keep", "EjectAfterFirstBoot"] = Field(
        default="Keep",
        description=("EjectAfterFirstBoot: empty the cdroms once the first run has ended (the guest powered off "
                     "after booting, e.g. at the end of an install); never while it runs, and an in-guest "
                     "reboot does not count. status.mediaEjected records it."))
    host_failure_policy: Literal["Wait", "Recreate"] = Field(
        default="Wait",
        description=("What happens when the VM's LibvirtHost is declared out of service (spec.outOfService: its "
                     "domains are known not to run: powered off or fenced). Wait: the VM stays placed there and its "
                     "domain is neither started nor stopped until the host is back in service. Recreate: its copy there is powered off and undefined when the host can "
                     "be reached (and recorded in status.staleDomainHosts when it cannot, to be removed first "
                     "when the host returns), then the VM is placed again by hostSelector on another host and "
                     "started per runStrategy. Only when every volume disk can follow: its pool is in "
                     "spec.sharedPools of both hosts (the same storage seen from each); otherwise the VM waits "
                     "and its status names the disks that cannot follow. A host that is merely unreachable is "
                     "never left: its QEMU may still run. Needs hostSelector (hostRef pins the VM)."))


class StartFailure(ApiModel):
    """Backoff state for RerunOnFailure."""

    consecutive_fail_count: int = Field(ge=0, description="Failures in a row.")
    retry_after: dt.datetime | None = Field(default=None, description="The VM is not restarted before this time.")


AddressSource = Literal["agent", "lease", "arp"]


class IPAddressStatus(ApiModel):
    """One address of an interface, with where it was learned."""

    address: str = Field(description="The IP address, e.g. 192.168.122.15 or fd00::15.")
    prefix: int | None = Field(default=None, ge=0, le=128, description="Prefix length (netmask), e.g. 24.")
    family: Literal["IPv4", "IPv6"] = Field(description="Address family.")
    source: AddressSource = Field(description=(
        "Where libvirt learned it: agent (the QEMU guest agent inside the guest, most exact), lease "
        "(the DHCP lease of a libvirt network) or arp (the host's neighbour table, least exact)."))


class InterfaceStatus(ApiModel):
    """What libvirt knows about an interface."""

    name: str = Field(description="Interface name from the spec.")
    mac: str | None = Field(default=None, description="MAC address.")
    network: str | None = Field(default=None, description="The libvirt network it is attached to (type network).")
    bridge: str | None = Field(default=None, description="The host bridge it is attached to (type bridge).")
    ip_addresses: list[IPAddressStatus] = Field(
        default_factory=list,
        description=("Addresses of the running guest on this interface (IPv4 first), from the most exact source "
                     "that knows any: agent, then lease, then arp. Empty while stopped or not yet known."))


class VolumeStatus(ApiModel):
    """A volume the operator created for this VM (deleted with it)."""

    disk: str = Field(description="Disk name from the spec.")
    pool: str = Field(description="Storage pool.")
    name: str = Field(description="Volume name in the pool.")


VmAction = Literal["start", "stop", "restart", "pause", "unpause"]
ACTIONS: tuple[str, ...] = ("start", "stop", "restart", "pause", "unpause")


class LastAction(ApiModel):
    """The outcome of the last action request (annotation virt.libvirt-operator.io/action-request)."""

    id: str = Field(description="The request's id; a request is executed once per id.")
    action: str | None = Field(default=None, description="start, stop, restart, pause or unpause (as requested).")
    phase: Literal["Pending", "Succeeded", "Failed"] = Field(description="Pending while it runs.")
    message: str | None = Field(default=None, description="What happened, or why it was refused.")
    requested_by: str | None = Field(default=None, description="Who asked (as the request says; informational).")
    time: dt.datetime | None = Field(default=None, description="When the phase was recorded.")


class VirtualMachineStatus(ApiModel):
    """Observed state of the VM."""

    observed_generation: int | None = observed_generation_field()
    conditions: list[Condition] = conditions_field()
    printable_status: PrintableStatus | None = Field(default=None, description="One-word state for humans.")
    host: str | None = Field(default=None, description=(
        "The LibvirtHost the VM was placed on. Changes only when hostFailurePolicy Recreate moves the VM off "
        "an out-of-service host."))
    migration_target_host: str | None = Field(
        default=None, description=("Set while a VirtualMachineMigration moves the VM to this host; an operator that "
                                   "restarts meanwhile looks for the domain on both hosts before anything else."))
    stale_domain_hosts: list[str] = Field(
        default_factory=list, json_schema_extra={"x-kubernetes-list-type": "set"},
        description=("Out-of-service hosts the VM was recreated away from that could not be reached at the time: "
                     "they may still hold its domain (stopped: the host was declared out of service). The operator "
                     "powers it off and undefines it there as soon as the host answers, before anything else, "
                     "and removes the entry."))
    domain_name: str | None = Field(default=None, description="libvirt domain name.")
    domain_uuid: str | None = Field(default=None, alias="domainUUID",
                                    description="libvirt domain UUID (= metadata.uid).")
    run_strategy: RunStrategy | None = Field(default=None, description="The run strategy last acted on.")
    domain_type: Literal["kvm", "qemu"] | None = Field(default=None, description="Domain type in use.")
    start_failure: StartFailure | None = Field(default=None, description="Restart backoff (RerunOnFailure).")
    interfaces: list[InterfaceStatus] = Field(default_factory=list, description="Interfaces as libvirt sees them.")
    ip_address: str | None = Field(default=None, description=(
        "The first address of the first interface that has one (the IP column); empty while none is known."))
    volumes: list[VolumeStatus] = Field(default_factory=list, description="Volumes the operator created.")
    first_boot_time: dt.datetime | None = Field(default=None, description="When the guest first ran.")
    last_start_time: dt.datetime | None = Field(
        default=None, description=("When the current run started (set on start, cleared once the operator has "
                                   "seen the domain stop); used to tell crash loops from long runs."))
    stop_requested_time: dt.datetime | None = Field(
        default=None, description="When a graceful shutdown was requested; cleared once the domain is off.")
    media_ejected: bool | None = Field(default=None, description="Install media was ejected after first boot.")
    error: ErrorStatus | None = Field(default=None, description="The last failure; cleared once healthy.")
    last_action: LastAction | None = Field(
        default=None, description="The outcome of the last start/stop/restart/pause/unpause request.")


class VirtualMachine(Resource):
    """A virtual machine on a libvirt host."""

    info: ClassVar[ResourceInfo] = ResourceInfo(
        kind="VirtualMachine", plural="virtualmachines", singular="virtualmachine", short_names=("lvvm",),
        namespaced=True, description="A virtual machine on one of the LibvirtHosts.",
        printer_columns=(
            PrinterColumn("Host", ".status.host"),
            PrinterColumn("Status", ".status.printableStatus"),
            PrinterColumn("IP", ".status.ipAddress", description="The VM's first IP address."),
            ready_column(),
            reason_column(),
            age_column(),
        ),
    )
    spec_validations: ClassVar[list[dict[str, str]]] = [
        *quantity_rules("memory", MIN_MEMORY, MAX_MEMORY),
        {"rule": "!(has(self.hostRef) && has(self.hostSelector))",
         "message": "set hostRef or hostSelector, not both"},
        {"rule": "has(self.hostRef) == has(oldSelf.hostRef) && (!has(self.hostRef) || self.hostRef == oldSelf.hostRef)",
         "message": "hostRef is immutable: a VM never moves; delete and recreate it to place it elsewhere"},
        {"rule": "!has(self.hostRef) || !has(self.hostFailurePolicy) || self.hostFailurePolicy != 'Recreate'",
         "message": "hostFailurePolicy Recreate needs hostSelector (or no host constraint): hostRef pins the VM to "
                    "one host, so it cannot be recreated on another"},
    ]

    spec: VirtualMachineSpec = Field(description="Desired state of the VM.")
    status: VirtualMachineStatus | None = Field(default=None, description=(
        "Observed state of the VM. Ready=True means the VM is in the power state its runStrategy asks for: "
        "running (reason Running), or stopped on purpose (reason Stopped: runStrategy Halted, a finished Once "
        "run, a clean guest shutdown under RerunOnFailure, a stopped Manual VM) — a VM halted on purpose is "
        "healthy. Ready=False while starting, stopping, waiting for placement or media, or crash-looping. "
        "Scheduled: placement on a host. RestartRequired: the definition changed while running and takes "
        "effect at the next boot."))

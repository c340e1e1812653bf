"""DomainDefinition: everything the operator decides about a libvirt domain, as plain data.

Built by reconcile (from a VirtualMachine and its placement), rendered to XML by
adapters.libvirt.domain_xml. No I/O and no libvirt here.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import re
from typing import Literal

# Our own XML namespace for <metadata> (libvirt requires metadata elements to carry one).
METADATA_NS = "https://libvirt-operator.io/xmlns/domain/v1"
METADATA_PREFIX = "lvop"
MAX_DOMAIN_NAME = 63
SERIAL_LOG_DIR = "/var/log/libvirt/qemu"

_UNSAFE = re.compile(r"[^a-z0-9.-]")


@dataclasses.dataclass(frozen=True)
class Owner:
    """The VirtualMachine a domain belongs to (recorded in the domain's <metadata>)."""

    namespace: str
    name: str
    uid: str


@dataclasses.dataclass(frozen=True)
class DiskDefinition:
    name: str                      # disk name from the spec
    device: Literal["disk", "cdrom"]
    path: str | None               # file path on the host (volume path); None = empty cdrom
    format: Literal["qcow2", "raw"] = "qcow2"
    boot_order: int | None = None
    pool: str | None = None        # where the backing volume lives (informational)
    volume: str | None = None


@dataclasses.dataclass(frozen=True)
class InterfaceDefinition:
    name: str
    type: Literal["user", "network", "bridge"] = "user"
    source: str | None = None
    model: str = "virtio"
    mac: str | None = None


@dataclasses.dataclass(frozen=True)
class DomainDefinition:
    name: str
    uuid: str
    vcpus: int
    memory_bytes: int
    type: Literal["kvm", "qemu", "test"]
    firmware: Literal["bios", "uefi"]
    owner: Owner
    disks: tuple[DiskDefinition, ...] = ()
    interfaces: tuple[InterfaceDefinition, ...] = ()
    arch: str | None = None
    serial_log: str | None = None  # default: SERIAL_LOG_DIR/<name>-serial.log

    @property
    def serial_log_path(self) -> str:
        return self.serial_log or f"{SERIAL_LOG_DIR}/{self.name}-serial.log"


SHORTENED_MARK = "__"
"""Separates a shortened domain name from its uid digest. A plain ``<namespace>_<name>`` holds exactly
one ``_`` (Kubernetes names never contain one), so no plain name can equal a shortened one."""
VOLUME_PREFIX = "lvop-"


def domain_name(namespace: str, name: str, uid: str) -> str:
    """Deterministic, collision-free libvirt domain name: ``<namespace>_<name>``.

    Kubernetes names never contain ``_``, so the join is unambiguous. Anything outside
    ``[a-z0-9.-]`` is replaced (defence in depth). Names longer than 63 characters are cut and
    suffixed with ``__`` and a digest of the uid: ``__`` never occurs in a plain name, so a VM named
    like another VM's shortened domain name cannot take that name over, and two shortened names
    differ whenever the uids do (48-bit digest of a server-assigned uid).

    The name is chosen when the domain is created; afterwards the domain is found by its UUID (the
    VM's uid) and keeps the name it has, so this may change without renaming existing domains.
    """
    base = f"{_UNSAFE.sub('-', namespace.lower())}_{_UNSAFE.sub('-', name.lower())}"
    if len(base) <= MAX_DOMAIN_NAME:
        return base
    digest = hashlib.sha256(uid.encode()).hexdigest()[:12]
    cut = base[:MAX_DOMAIN_NAME - len(SHORTENED_MARK) - len(digest)].rstrip("-._")
    return f"{cut}{SHORTENED_MARK}{digest}"


def volume_name(uid: str, disk: str) -> str:
    """Name of the volume the operator creates for a disk: ``lvop-<vm uid>-<disk>``.

    The uid has a fixed length (36) and disk names are DNS labels, so the name is collision-free by
    construction and shows on the host which VirtualMachine owns the volume. Only volumes named with
    a VM's own uid are ever adopted or deleted for it (see `owns_volume`).
    """
    return f"{owned_volume_prefix(uid)}{disk}"


def owned_volume_prefix(uid: str) -> str:
    """Every volume created for the VM with this uid, and no other, starts with this."""
    if not uid:
        raise ValueError("a VirtualMachine without a uid owns no volumes")
    return f"{VOLUME_PREFIX}{uid}-"


def owns_volume(uid: str, volume: str) -> bool:
    """Whether a volume name says it was created for the VM with this uid."""
    prefix = owned_volume_prefix(uid)
    return volume.startswith(prefix) and len(volume) > len(prefix)


def legacy_volume_name(domain: str, disk: str) -> str:
    """The earlier releases' scheme ``<domain-name>-<disk>`` (ambiguous: ``a``+``b-root`` = ``a-b``+``root``).
    Such a volume counts as a VM's only when the VM's own domain (UUID = uid) uses it for that disk."""
    return f"{domain}-{disk}"


class PowerState(str, enum.Enum):
    """The power state of a domain as the operator reasons about it (from libvirt's state codes)."""

    ABSENT = "Absent"            # no such domain on the host
    RUNNING = "Running"          # running or blocked
    PAUSED = "Paused"            # suspended (paused, pm-suspended)
    SHUTTING_DOWN = "ShuttingDown"
    SHUTOFF = "Shutoff"
    CRASHED = "Crashed"          # libvirt's CRASHED state (on_crash=preserve)
    UNKNOWN = "Unknown"


class StopCause(str, enum.Enum):
    """Why a shut-off domain stopped (libvirt's shutoff reason)."""

    NONE = "None"                # never ran, or not shut off
    CLEAN = "Clean"              # the guest shut itself down
    DESTROYED = "Destroyed"      # powered off from outside (virsh destroy, the operator)
    FAILURE = "Failure"          # QEMU crashed, failed to start or was killed
    UNKNOWN = "Unknown"          # lost (daemon restart) or other (saved, migrated, snapshot)


@dataclasses.dataclass(frozen=True)
class DomainObservation:
    """What one libvirt call saw of a domain."""

    state: PowerState
    stop_cause: StopCause = StopCause.NONE
    name: str | None = None
    uuid: str | None = None

    @property
    def exists(self) -> bool:
        return self.state is not PowerState.ABSENT

    @property
    def active(self) -> bool:
        return self.state in (PowerState.RUNNING, PowerState.PAUSED, PowerState.SHUTTING_DOWN)


ABSENT = DomainObservation(PowerState.ABSENT)

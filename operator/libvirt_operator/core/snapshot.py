"""What a snapshot decision needs to know about a domain, as plain data (read by
adapters.libvirt.snapshots, judged by reconcile.snapshot). No I/O and no libvirt here."""

from __future__ import annotations

import dataclasses

SNAPSHOT_PREFIX = "lvop-snap-"


def libvirt_snapshot_name(snapshot_uid: str) -> str:
    """The libvirt snapshot of a VirtualMachineSnapshot: named with the object's uid (fixed length,
    [0-9a-f-]), so it is found, and deleted, from the object alone, never from its status."""
    if not snapshot_uid:
        raise ValueError("a VirtualMachineSnapshot without a uid has no libvirt snapshot")
    return f"{SNAPSHOT_PREFIX}{snapshot_uid}"


@dataclasses.dataclass(frozen=True)
class DiskInfo:
    """One <disk> of the domain's definition."""

    target: str                  # vda, hda, …
    device: str                  # disk, cdrom, floppy, lun
    format: str | None           # the driver type: qcow2, raw, …
    name: str | None = None      # the spec's disk name (our ua-disk-<name> alias), None when not ours
    path: str | None = None      # source file
    source_type: str = "file"    # file, block, network, volume
    readonly: bool = False


@dataclasses.dataclass(frozen=True)
class DomainSnapshotView:
    """The domain as a snapshot sees it."""

    active: bool                 # running or paused: an online snapshot
    disks: tuple[DiskInfo, ...]
    pflash: bool = False         # UEFI firmware with writable NVRAM (raw): no online internal snapshot

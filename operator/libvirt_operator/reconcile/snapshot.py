"""Snapshot and restore decisions (pure: no kopf, no libvirt): which disks a snapshot captures, what
is refused and why, and whether a restore may run now.

Why internal qcow2 snapshots (checked on libvirt 9.0 / QEMU 7.2, the Debian 12 daemon these tests run):
* internal disk-only snapshots work on a stopped domain, and libvirt reverts and deletes them; the
  snapshot lives inside the disk's own volume, so the domain keeps pointing at the same file, the VM
  reconcile (which redefines the domain from the spec) never has to learn about overlays, and deleting
  the VM's volumes deletes its snapshots with them: nothing can leak.
* on a running domain libvirt refuses internal disk-only snapshots ("active qemu domains require
  external disk snapshots") and internal ones without memory ("must include the memory state"), so an
  online snapshot is internal with the guest's memory saved alongside (the guest pauses while it is
  written); a restore reverts to it paused and powers it off at once, so only the disks come back.
* external disk-only snapshots work online, but libvirt 9.0 cannot revert to them ("revert to external
  snapshot not supported yet"): the operator would have to rewrite overlay chains itself and follow the
  domain's changing disk paths (each snapshot moves the disk to a new overlay file) in every redefine,
  where a mistake points a guest at a frozen backing file. Not worth the risk here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

from ..core.errors import AppError, ErrorCode
from ..core.snapshot import DiskInfo, DomainSnapshotView

SNAPSHOT_FORMATS = {"qcow2"}
# runStrategies that would start the VM while its disks are being put back.
_STARTS_BY_ITSELF = {"Always", "RerunOnFailure"}


@dataclasses.dataclass(frozen=True)
class SnapshotPlan:
    disks: tuple[DiskInfo, ...]      # captured (internal qcow2 snapshot)
    skipped: tuple[DiskInfo, ...]    # left out on purpose: cdroms and other read-only media
    online: bool                     # the domain runs: its memory is saved alongside


def _label(disk: DiskInfo) -> str:
    return f"disk {disk.name} ({disk.target})" if disk.name else f"disk {disk.target}"


def plan_snapshot(view: DomainSnapshotView, host: str) -> SnapshotPlan:
    """The disks to capture; SNAPSHOT_UNSUPPORTED when a writable disk cannot be (every disk must be
    captured: a snapshot that silently left one out would restore a VM whose disks disagree)."""
    captured, skipped = [], []
    for disk in view.disks:
        if disk.device == "cdrom" or disk.readonly:
            skipped.append(disk)
            continue
        if disk.device != "disk" or disk.source_type != "file" or disk.format not in SNAPSHOT_FORMATS:
            what = f"a {disk.format or 'unknown'}-format" if disk.device == "disk" else f"a {disk.device}"
            raise AppError(ErrorCode.SNAPSHOT_UNSUPPORTED,
                           f"{_label(disk)} is {what} {disk.source_type} disk: only qcow2 file disks can be "
                           "snapshotted (cdroms are left out by themselves)",
                           {"host": host, "disk": disk.name or disk.target, "format": disk.format or ""})
        captured.append(disk)
    if not captured:
        raise AppError(ErrorCode.SNAPSHOT_UNSUPPORTED, "the VM has no qcow2 disk to snapshot", {"host": host})
    if view.pflash:
        raise AppError(ErrorCode.SNAPSHOT_UNSUPPORTED,
                       "a VM with UEFI firmware cannot have internal snapshots (its NVRAM is a raw pflash file, "
                       "which libvirt cannot snapshot with it)", {"host": host})
    return SnapshotPlan(tuple(captured), tuple(skipped), view.active)


@dataclasses.dataclass(frozen=True)
class Refusal:
    error: AppError
    final: bool  # nothing the user can change makes it work: stop retrying


def check_restore(target: str, vm: Mapping[str, Any] | None, snapshot: Mapping[str, Any] | None,
                  snapshot_name: str) -> Refusal | None:
    """Before the host is asked: the snapshot exists, is ready, belongs to this very VM."""
    if snapshot is None:
        return Refusal(AppError(ErrorCode.SNAPSHOT_NOT_FOUND,
                                f"VirtualMachineSnapshot {snapshot_name} does not exist"), False)
    source = ((snapshot.get("spec") or {}).get("source") or {}).get("name")
    if source != target:
        return Refusal(AppError(ErrorCode.INVALID_SPEC,
                                f"VirtualMachineSnapshot {snapshot_name} is of VirtualMachine {source}, not {target}: "
                                "a snapshot can only be restored onto its own VM"), True)
    sstatus = snapshot.get("status") or {}
    if snapshot.get("metadata", {}).get("deletionTimestamp"):
        return Refusal(AppError(ErrorCode.SNAPSHOT_NOT_FOUND,
                                f"VirtualMachineSnapshot {snapshot_name} is being deleted"), True)
    if not sstatus.get("readyToUse"):
        if sstatus.get("phase") == "Failed":
            why = (sstatus.get("error") or {}).get("message") or "it failed"
            return Refusal(AppError(ErrorCode.SNAPSHOT_NOT_FOUND,
                                    f"VirtualMachineSnapshot {snapshot_name} failed: {why}"), True)
        return Refusal(AppError(ErrorCode.SNAPSHOT_NOT_FOUND,
                                f"VirtualMachineSnapshot {snapshot_name} is not ready to use yet"), False)
    if vm is None:
        return Refusal(AppError(ErrorCode.SNAPSHOT_SOURCE_NOT_FOUND, f"VirtualMachine {target} does not exist"), False)
    if (vm.get("metadata") or {}).get("uid") != sstatus.get("sourceUid"):
        return Refusal(AppError(ErrorCode.SNAPSHOT_NOT_FOUND,
                                f"VirtualMachine {target} was recreated since snapshot {snapshot_name} was taken: "
                                "the snapshot went with the old VM's disks"), True)
    return None


def restore_refusal(run_strategy: str, active: bool, vm_name: str) -> AppError | None:
    """The VM must be stopped and stay stopped while its disks are put back; the spec is the user's
    (Git's) to change, never the operator's."""
    if active:
        return AppError(ErrorCode.RESTORE_TARGET_RUNNING,
                        f"VirtualMachine {vm_name} is running: set spec.runStrategy: Halted; the restore runs once "
                        "it is stopped", {"runStrategy": run_strategy})
    if run_strategy in _STARTS_BY_ITSELF:
        return AppError(ErrorCode.RESTORE_TARGET_RUNNING,
                        f"VirtualMachine {vm_name} has runStrategy {run_strategy}, which would start it during the "
                        "restore: set spec.runStrategy: Halted; the restore runs once it is stopped",
                        {"runStrategy": run_strategy})
    return None


RESTORE_GRACE = dt.timedelta(minutes=5)  # KubeVirt's WaitGracePeriod


def restore_gives_up(policy: str, created: dt.datetime | None, now: dt.datetime) -> bool:
    """A restore refused because its VM runs: wait (retried) or fail for good, per its targetReadinessPolicy.
    Waiting forever is opt-in: a restore that fires whenever the VM happens to stop, weeks later, would
    throw away everything written since."""
    if policy == "WaitEventually":
        return False
    if policy == "FailImmediate" or created is None:
        return True
    return now - created >= RESTORE_GRACE


def snapshot_size(disks: list[dict[str, Any]]) -> int:
    return sum(int(d.get("allocationBytes") or 0) for d in disks)

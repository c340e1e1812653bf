"""VirtualMachineSnapshot and VirtualMachineRestore: disk snapshots of a VirtualMachine on its host,
and putting one back. Names and status fields follow KubeVirt's snapshot.kubevirt.io kinds
(source/target, readyToUse, creationTime, phase, complete, restoreTime, error {message, time}),
plus our error code and runbook links like every other kind."""

from __future__ import annotations

import datetime as dt
from typing import ClassVar, Literal

from pydantic import Field

from .common import (
    GROUP, OBJECT_NAME_PATTERN, ApiModel, Condition, PrinterColumn, RemediationLink, Resource, ResourceInfo,
    age_column, conditions_field, observed_generation_field,
)

SnapshotPhase = Literal["InProgress", "Succeeded", "Failed", "Unknown"]
_IMMUTABLE = [{"rule": "self == oldSelf", "message": "spec is immutable: create a new object instead"}]


class VirtualMachineReference(ApiModel):
    """A VirtualMachine in the same namespace (KubeVirt's TypedLocalObjectReference)."""

    api_group: Literal["virt.libvirt-operator.io"] = Field(
        default=GROUP, description=f"API group of the referenced object: {GROUP}.",
        json_schema_extra={"enum": [GROUP]})
    kind: Literal["VirtualMachine"] = Field(default="VirtualMachine", description="Kind: VirtualMachine.",
                                            json_schema_extra={"enum": ["VirtualMachine"]})
    name: str = Field(description="Name of the VirtualMachine.", min_length=1, max_length=253,
                      pattern=OBJECT_NAME_PATTERN)


class SnapshotErrorStatus(ApiModel):
    """The last failure (KubeVirt's {message, time}) with a stable code and runbook links. Cleared once it works."""

    code: str = Field(description="Stable error code, e.g. SNAPSHOT_UNSUPPORTED (see the runbooks).")
    message: str = Field(description="What went wrong, in one human sentence.")
    time: dt.datetime = Field(description="When this error was first seen.")
    context: dict[str, str] = Field(default_factory=dict, description="Safe details (host, disk, …); never secrets.")
    remediation: list[RemediationLink] = Field(
        default_factory=list, description="Runbooks most relevant to this error, best first.")


class SnapshotDiskStatus(ApiModel):
    """One disk captured by the snapshot."""

    name: str = Field(description="Disk name from the VirtualMachine's spec.")
    target: str = Field(description="The disk's device on the host (e.g. vda).")
    volume: str | None = Field(default=None, description="The volume (file) on the host that holds the snapshot.")
    capacity_bytes: int | None = Field(default=None, ge=0, description="Virtual size of the disk.")
    allocation_bytes: int | None = Field(
        default=None, ge=0, description="Bytes the volume had allocated when the snapshot was taken.")


class VirtualMachineSnapshotSpec(ApiModel):
    """What to snapshot. Immutable."""

    source: VirtualMachineReference = Field(description="The VirtualMachine whose disks are snapshotted.")


class VirtualMachineSnapshotStatus(ApiModel):
    """Observed state of the snapshot."""

    observed_generation: int | None = observed_generation_field()
    conditions: list[Condition] = conditions_field()
    source_uid: str | None = Field(default=None, description="metadata.uid of the VirtualMachine snapshotted.")
    phase: SnapshotPhase | None = Field(default=None, description="InProgress, Succeeded, Failed or Unknown.")
    ready_to_use: bool | None = Field(default=None, description="True once the snapshot can be restored.")
    creation_time: dt.datetime | None = Field(default=None, description="When the snapshot was taken.")
    host: str | None = Field(default=None, description="The LibvirtHost holding the snapshot.")
    snapshot_name: str | None = Field(default=None, description="The libvirt snapshot's name on the host.")
    indications: list[Literal["Online", "Offline"]] = Field(
        default_factory=list, description=(
            "Online: taken while the VM ran (a crash-consistent disk state; the guest was paused while its "
            "memory was saved alongside, which a restore discards). Offline: taken while it was stopped."))
    disks: list[SnapshotDiskStatus] = Field(default_factory=list, description="The disks captured.")
    size_bytes: int | None = Field(
        default=None, ge=0,
        description=("Bytes allocated by the captured disks' volumes when the snapshot was taken: what the "
                     "snapshot keeps on the host at most (internal qcow2 snapshots share unchanged clusters)."))
    error: SnapshotErrorStatus | None = Field(default=None, description="The last failure; cleared once it works.")


class VirtualMachineSnapshot(Resource):
    """A disk snapshot of a VirtualMachine, kept on its host until this object is deleted."""

    info: ClassVar[ResourceInfo] = ResourceInfo(
        kind="VirtualMachineSnapshot", plural="virtualmachinesnapshots", singular="virtualmachinesnapshot",
        short_names=("lvvmsnap",), namespaced=True,
        description=("A snapshot of a VirtualMachine's qcow2 disks (internal qcow2 snapshots on its host), taken "
                     "with the VM running or stopped; deleting the object deletes the snapshot on the host."),
        printer_columns=(
            PrinterColumn("SourceKind", ".spec.source.kind"),
            PrinterColumn("SourceName", ".spec.source.name"),
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn("ReadyToUse", ".status.readyToUse", type="boolean"),
            PrinterColumn("CreationTime", ".status.creationTime", type="date"),
            PrinterColumn("Size", ".status.sizeBytes", type="integer", priority=1,
                          description="Bytes allocated by the captured disks when taken."),
            PrinterColumn("Error", ".status.error.code"),
            age_column(),
        ),
    )
    spec_validations: ClassVar[list[dict[str, str]]] = _IMMUTABLE

    spec: VirtualMachineSnapshotSpec = Field(description="The VirtualMachine to snapshot. Immutable.")
    status: VirtualMachineSnapshotStatus | None = Field(default=None, description="Observed state of the snapshot.")


class RestoredDisk(ApiModel):
    """One disk put back."""

    name: str = Field(description="Disk name from the VirtualMachine's spec.")
    target: str = Field(description="The disk's device on the host (e.g. vda).")


class VirtualMachineRestoreSpec(ApiModel):
    """Which snapshot to put back, onto which VM. Immutable."""

    target: VirtualMachineReference = Field(
        description="The VirtualMachine to restore: the snapshot's own source (restoring onto another VM is "
                    "not supported). It must be stopped: runStrategy Halted (or Manual/Once and shut off).")
    virtual_machine_snapshot_name: str = Field(
        description="Name of the VirtualMachineSnapshot (same namespace).", min_length=1, max_length=253,
        pattern=OBJECT_NAME_PATTERN)
    target_readiness_policy: Literal["WaitGracePeriod", "WaitEventually", "FailImmediate"] = Field(
        default="WaitGracePeriod", description=(
            "What to do while the VM is not stopped (KubeVirt's names): WaitGracePeriod waits up to 5 minutes "
            "from the restore's creation, then fails; WaitEventually waits as long as it takes (the disks are put "
            "back whenever the VM stops, even much later); FailImmediate fails at once."))


class VirtualMachineRestoreStatus(ApiModel):
    """Observed state of the restore."""

    observed_generation: int | None = observed_generation_field()
    conditions: list[Condition] = conditions_field()
    complete: bool | None = Field(default=None, description="True once the disks hold the snapshot's content.")
    restore_time: dt.datetime | None = Field(default=None, description="When the restore completed.")
    target_uid: str | None = Field(default=None, description="metadata.uid of the VirtualMachine restored.")
    restores: list[RestoredDisk] = Field(default_factory=list, description="The disks put back.")
    error: SnapshotErrorStatus | None = Field(default=None, description="The last failure; cleared once it works.")


class VirtualMachineRestore(Resource):
    """Puts a VirtualMachineSnapshot back onto its (stopped) VirtualMachine, once."""

    info: ClassVar[ResourceInfo] = ResourceInfo(
        kind="VirtualMachineRestore", plural="virtualmachinerestores", singular="virtualmachinerestore",
        short_names=("lvvmrestore",), namespaced=True,
        description=("Restores a VirtualMachineSnapshot onto its stopped VirtualMachine: the disks go back to the "
                     "snapshot's content; the spec is never changed. Runs once; delete and recreate to run again."),
        printer_columns=(
            PrinterColumn("TargetKind", ".spec.target.kind"),
            PrinterColumn("TargetName", ".spec.target.name"),
            PrinterColumn("Complete", ".status.complete", type="boolean"),
            PrinterColumn("RestoreTime", ".status.restoreTime", type="date"),
            PrinterColumn("Error", ".status.error.code"),
            age_column(),
        ),
    )
    spec_validations: ClassVar[list[dict[str, str]]] = _IMMUTABLE

    spec: VirtualMachineRestoreSpec = Field(description="The snapshot and the VM. Immutable.")
    status: VirtualMachineRestoreStatus | None = Field(default=None, description="Observed state of the restore.")

"""VirtualMachineMigration: move a running VirtualMachine to another LibvirtHost, live (KubeVirt's
VirtualMachineInstanceMigration: one object per move, spec immutable, status.phase), with its disks
copied shared-nothing (qcow2 volumes of host-local pools)."""

from __future__ import annotations

import datetime as dt
from typing import ClassVar, Literal

from pydantic import Field

from .common import (
    OBJECT_NAME_PATTERN, ApiModel, Condition, PrinterColumn, Resource, ResourceInfo, age_column, conditions_field,
    observed_generation_field,
)
from .snapshot import SnapshotErrorStatus

MigrationPhase = Literal["Pending", "Running", "Succeeded", "Failed"]


class VirtualMachineMigrationSpec(ApiModel):
    """Which VM to move, and optionally where. Immutable."""

    vm_name: str = Field(description="Name of the VirtualMachine (same namespace). It must be running.",
                         min_length=1, max_length=253, pattern=OBJECT_NAME_PATTERN)
    target_host: str | None = Field(
        default=None, min_length=1, max_length=253, pattern=OBJECT_NAME_PATTERN,
        description=("The LibvirtHost to move to. Empty: chosen like a placement (the VM's hostSelector, room, "
                     "tenancy), never the current host; cordoned and out-of-service hosts are never chosen."))
    bandwidth_mib_per_second: int | None = Field(
        default=None, ge=1, le=100000, description="Cap on the copy rate (disks and memory), MiB/s. Empty: no cap.")
    timeout_seconds: int = Field(
        default=600, ge=10, le=86400,
        description="The migration is aborted (and the VM keeps running where it was) after this long.")


class MigrationProgress(ApiModel):
    """How far the copy is (libvirt's job statistics, refreshed while it runs)."""

    stage: Literal["setup", "disks", "memory"] = Field(description="What is being copied now.")
    data_processed_bytes: int = Field(ge=0, description="Bytes sent so far (disks and memory).")
    data_total_bytes: int = Field(ge=0, description="Bytes to send, as far as known.")
    elapsed_seconds: float = Field(ge=0, description="Seconds since the copy started.")


class VirtualMachineMigrationStatus(ApiModel):
    """Observed state of the migration."""

    observed_generation: int | None = observed_generation_field()
    conditions: list[Condition] = conditions_field()
    phase: MigrationPhase | None = Field(default=None, description="Pending, Running, Succeeded or Failed.")
    vm_uid: str | None = Field(default=None, description="metadata.uid of the VirtualMachine moved.")
    source_host: str | None = Field(default=None, description="The LibvirtHost the VM ran on.")
    target_host: str | None = Field(default=None, description="The LibvirtHost the VM moves to.")
    start_time: dt.datetime | None = Field(default=None, description="When the copy started.")
    end_time: dt.datetime | None = Field(default=None, description="When it succeeded or failed.")
    progress: MigrationProgress | None = Field(default=None, description="The copy's progress while it runs.")
    downtime_ms: int | None = Field(default=None, ge=0, description="How long the guest was paused at the switch.")
    error: SnapshotErrorStatus | None = Field(
        default=None, description="Why it failed (the VM keeps running on the source host), with runbook links.")


class VirtualMachineMigration(Resource):
    """Moves a running VirtualMachine to another LibvirtHost, once."""

    info: ClassVar[ResourceInfo] = ResourceInfo(
        kind="VirtualMachineMigration", plural="virtualmachinemigrations", singular="virtualmachinemigration",
        short_names=("lvvmim",), namespaced=True,
        description=("Moves a running VirtualMachine to another LibvirtHost without stopping it (live migration; "
                     "its disks are copied). Runs once; a failure rolls back and the VM keeps running where it was."),
        printer_columns=(
            PrinterColumn("VM", ".spec.vmName"),
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn("Source", ".status.sourceHost"),
            PrinterColumn("Target", ".status.targetHost"),
            PrinterColumn("Error", ".status.error.code"),
            age_column(),
        ),
    )
    spec_validations: ClassVar[list[dict[str, str]]] = [
        {"rule": "self == oldSelf", "message": "spec is immutable: create a new VirtualMachineMigration instead"}]

    spec: VirtualMachineMigrationSpec = Field(description="The VM and where it goes. Immutable.")
    status: VirtualMachineMigrationStatus | None = Field(default=None, description="Observed state of the migration.")

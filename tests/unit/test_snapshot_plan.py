"""Snapshot and restore decisions (reconcile.snapshot) and the snapshot XML (adapters.libvirt.snapshots)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from libvirt_operator.adapters.libvirt.domain_xml import build_domain_xml
from libvirt_operator.adapters.libvirt.snapshots import parse_disks, snapshot_xml
from libvirt_operator.core.domain import DiskDefinition, DomainDefinition, Owner
from libvirt_operator.core.errors import AppError, ErrorCode
from libvirt_operator.core.snapshot import DiskInfo, DomainSnapshotView, libvirt_snapshot_name
import datetime as dt

from libvirt_operator.reconcile.snapshot import check_restore, plan_snapshot, restore_gives_up, restore_refusal

UID = "7d1e0f3c-2a4b-4c6d-8e9f-a1b2c3d4e5f6"


def domain(firmware: str = "bios", *disks: DiskDefinition) -> str:
    return build_domain_xml(DomainDefinition(
        name="ns_vm", uuid=UID, vcpus=1, memory_bytes=64 << 20, type="qemu", firmware=firmware,  # type: ignore[arg-type]
        owner=Owner("ns", "vm", UID), disks=disks))


ROOT = DiskDefinition("root", "disk", "/pool/lvop-x-root")
CD = DiskDefinition("cd", "cdrom", "/pool/iso-x", boot_order=1)


def test_operator_domains_capture_their_qcow2_disks_and_leave_cdroms_out() -> None:
    view = parse_disks(domain("bios", CD, ROOT, DiskDefinition("data", "disk", "/pool/lvop-x-data")))
    plan = plan_snapshot(view, "kvm-1")
    assert [(d.name, d.target) for d in plan.disks] == [("root", "vda"), ("data", "vdb")]
    assert [d.target for d in plan.skipped] == ["hda"] and not plan.online
    root = ET.fromstring(snapshot_xml("lvop-snap-1", "desc", plan.disks, plan.skipped, online=False))
    assert {d.get("name"): d.get("snapshot") for d in root.iterfind("./disks/disk")} == \
        {"vda": "internal", "vdb": "internal", "hda": "no"}
    assert root.find("memory") is None


def test_an_online_snapshot_saves_memory_alongside() -> None:
    view = DomainSnapshotView(active=True, disks=(DiskInfo("vda", "disk", "qcow2", "root", "/p/r"),))
    plan = plan_snapshot(view, "h")
    assert plan.online
    xml = ET.fromstring(snapshot_xml("n", "d", plan.disks, plan.skipped, online=True))
    assert xml.find("memory").get("snapshot") == "internal"


@pytest.mark.parametrize(("disk", "words"), [
    (DiskInfo("vdb", "disk", "raw", "data", "/p/d"), ["disk data (vdb)", "raw-format"]),
    (DiskInfo("vdb", "disk", "qcow2", None, "/dev/sdb", source_type="block"), ["disk vdb", "block"]),
    (DiskInfo("fda", "floppy", "raw", None, "/p/f"), ["a floppy"]),
])
def test_a_disk_that_cannot_be_captured_refuses_the_whole_snapshot(disk: DiskInfo, words: list[str]) -> None:
    view = DomainSnapshotView(active=False, disks=(DiskInfo("vda", "disk", "qcow2", "root", "/p/r"), disk))
    with pytest.raises(AppError) as err:
        plan_snapshot(view, "h")
    assert err.value.code is ErrorCode.SNAPSHOT_UNSUPPORTED and not err.value.retryable
    assert all(w in err.value.message for w in words), err.value.message


def test_no_disk_and_uefi_are_refused() -> None:
    with pytest.raises(AppError, match="no qcow2 disk"):
        plan_snapshot(parse_disks(domain("bios", CD)), "h")
    view = parse_disks(domain("uefi", ROOT))
    assert view.pflash
    with pytest.raises(AppError, match="UEFI"):
        plan_snapshot(view, "h")


def test_libvirt_snapshot_names_come_from_the_object_uid() -> None:
    assert libvirt_snapshot_name(UID) == f"lvop-snap-{UID}"
    with pytest.raises(ValueError):
        libvirt_snapshot_name("")


def _snap(source: str = "vm", **status: object) -> dict:
    return {"metadata": {"name": "s"}, "spec": {"source": {"name": source}}, "status": status}


VM = {"metadata": {"uid": UID}, "spec": {"runStrategy": "Halted"}}


@pytest.mark.parametrize(("vm", "snap", "code", "final"), [
    (VM, None, ErrorCode.SNAPSHOT_NOT_FOUND, False),
    (VM, _snap("other", readyToUse=True, sourceUid=UID), ErrorCode.INVALID_SPEC, True),
    (VM, _snap(phase="InProgress"), ErrorCode.SNAPSHOT_NOT_FOUND, False),
    (VM, _snap(phase="Failed", error={"message": "raw disk"}), ErrorCode.SNAPSHOT_NOT_FOUND, True),
    (None, _snap(readyToUse=True, sourceUid=UID), ErrorCode.SNAPSHOT_SOURCE_NOT_FOUND, False),
    ({"metadata": {"uid": "new"}}, _snap(readyToUse=True, sourceUid=UID), ErrorCode.SNAPSHOT_NOT_FOUND, True),
])
def test_restore_checks_before_the_host(vm, snap, code, final) -> None:
    refusal = check_restore("vm", vm, snap, "s")
    assert refusal is not None and refusal.error.code is code and refusal.final is final


def test_a_ready_snapshot_of_the_same_vm_may_be_restored() -> None:
    assert check_restore("vm", VM, _snap(readyToUse=True, sourceUid=UID), "s") is None


@pytest.mark.parametrize(("strategy", "active", "refused"), [
    ("Halted", False, False), ("Manual", False, False), ("Once", False, False),
    ("Halted", True, True), ("Manual", True, True),
    ("Always", False, True), ("RerunOnFailure", False, True),  # they would start it meanwhile
])
def test_restore_only_onto_a_vm_that_is_and_stays_stopped(strategy: str, active: bool, refused: bool) -> None:
    err = restore_refusal(strategy, active, "vm")
    assert (err is not None) is refused
    if err is not None:
        assert err.code is ErrorCode.RESTORE_TARGET_RUNNING and "runStrategy: Halted" in err.message


def test_a_waiting_restore_gives_up_per_its_policy() -> None:
    created = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    soon, late = created + dt.timedelta(minutes=4), created + dt.timedelta(minutes=5)
    assert not restore_gives_up("WaitGracePeriod", created, soon) and restore_gives_up("WaitGracePeriod", created, late)
    assert restore_gives_up("FailImmediate", created, created)
    assert not restore_gives_up("WaitEventually", created, created + dt.timedelta(days=30))

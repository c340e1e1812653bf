"""VirtualMachineSnapshot / VirtualMachineRestore on a real libvirtd (QEMU/TCG) with the session operator.

The test guest (tests/harness/test_iso.py) reports at every boot whether its virtio disk's first
sector holds its marker, then writes it: so a boot shows what the disk held. A snapshot of the clean
disk, a boot that writes the marker, a restore, and the next boot finds the disk clean again."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from prometheus_client import REGISTRY

from tests.harness.http_server import TestHTTPServer
from tests.harness.kube import Kube, condition
from tests.harness.pytest_operator import loopback_downloads
from tests.harness.test_iso import DISK_MARKER_ABSENT, DISK_MARKER_PRESENT, Serial

try:
    import libvirt
except ImportError:  # the fixtures skip with the reason
    libvirt = None
else:
    libvirt.registerErrorHandler(lambda *_a: None, None)

VM, SNAP, RESTORE, ISO = "virtualmachines", "virtualmachinesnapshots", "virtualmachinerestores", "isoimages"
ACTION = "virt.libvirt-operator.io/action-request"
RUNNING, SHUTOFF = 1, 5


@pytest.fixture(scope="module")
def http(test_iso):
    with TestHTTPServer(Path(test_iso.path)) as srv:
        yield srv


@pytest.fixture(scope="module")
def iso_sha(test_iso) -> str:
    return hashlib.sha256(Path(test_iso.path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cache_dir(operator, tmp_path_factory) -> Any:
    with loopback_downloads(operator, tmp_path_factory.mktemp("snapshot-iso-cache")) as path:
        yield path


@pytest.fixture(scope="module")
def host(libvirtd_host: str) -> str:
    return libvirtd_host


@pytest.fixture
def conn(libvirtd):
    c = libvirt.open(libvirtd.uri)
    yield c
    c.close()


@pytest.fixture
def boot_iso(kube, namespace, host, http, cache_dir, iso_sha) -> Any:
    kube.create(ISO, {"metadata": {"name": "boot"}, "spec": {
        "source": {"url": http.url("/image")}, "checksum": f"sha256:{iso_sha}", "targets": {"hostNames": [host]}}},
        namespace)
    kube.wait_condition(ISO, "boot", "Ready", "True", namespace=namespace, timeout=90)
    yield "boot"
    kube.delete(ISO, "boot", namespace)  # before the module's host goes (the test's VMs are gone by then)
    kube.wait_for(lambda: kube.get(ISO, "boot", namespace) is None, timeout=60, what="ISOImage deleted")


def make_vm(kube: Kube, namespace: str, name: str, host: str, strategy: str, *, data_disk: bool = True) -> str:
    disks: list[dict[str, Any]] = [{"name": "cd", "bootOrder": 1, "cdrom": {"isoImageRef": {"name": "boot"}}}]
    if data_disk:
        disks.append({"name": "data", "volume": {"size": "16Mi"}})
    vm = kube.create(VM, {"metadata": {"name": name}, "spec": {
        "hostRef": host, "memory": "64Mi", "domainType": "qemu", "runStrategy": strategy,
        "terminationGracePeriodSeconds": 1, "disks": disks}}, namespace)
    return vm["metadata"]["uid"]


def printable(kube: Kube, namespace: str, name: str, value: str, timeout: float = 60) -> dict[str, Any]:
    return kube.wait_for(lambda: (o := kube.get(VM, name, namespace)) and
                         (o.get("status") or {}).get("printableStatus") == value and o,
                         timeout=timeout, what=f"{name} printableStatus={value}")


def snapshot(kube: Kube, namespace: str, name: str, vm: str) -> dict[str, Any]:
    return kube.create(SNAP, {"metadata": {"name": name}, "spec": {
        "source": {"apiGroup": "virt.libvirt-operator.io", "kind": "VirtualMachine", "name": vm}}}, namespace)


def ready_snapshot(kube: Kube, namespace: str, name: str, timeout: float = 60) -> dict[str, Any]:
    started = time.monotonic()
    obj = kube.wait_for(lambda: (o := kube.get(SNAP, name, namespace)) and
                        ((o.get("status") or {}).get("readyToUse") or (o.get("status") or {}).get("phase") == "Failed")
                        and o, timeout=timeout, what=f"snapshot {name} ready")
    print(f"measured: snapshot {name} created to readyToUse {time.monotonic() - started:.2f}s")
    assert obj["status"]["readyToUse"] is True, obj["status"]
    return obj


def restore(kube: Kube, namespace: str, name: str, vm: str, snap: str, **spec: Any) -> dict[str, Any]:
    return kube.create(RESTORE, {"metadata": {"name": name}, "spec": {
        "target": {"kind": "VirtualMachine", "name": vm}, "virtualMachineSnapshotName": snap, **spec}}, namespace)


def complete(kube: Kube, namespace: str, name: str, timeout: float = 60) -> dict[str, Any]:
    return kube.wait_for(lambda: (o := kube.get(RESTORE, name, namespace)) and
                         (o.get("status") or {}).get("complete") and o, timeout=timeout, what=f"restore {name}")


def set_strategy(kube: Kube, namespace: str, name: str, strategy: str) -> None:
    kube.patch(VM, name, {"spec": {"runStrategy": strategy}}, namespace)


def snapshots_on_host(conn: Any, uid: str) -> list[str]:
    return conn.lookupByUUIDString(uid).snapshotListNames(0)


def qcow2_snapshots(path: str) -> str:
    """What the volume itself says (qemu-img, shared lock: the domain may run)."""
    return subprocess.run(["qemu-img", "snapshot", "-U", "-l", path], capture_output=True, text=True,
                          check=True).stdout


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def argocd_health(obj: dict[str, Any]) -> str:
    """manifests/argocd/health.lua on the object, as Argo CD runs it (Lua 5.1); "" without lupa."""
    try:
        import lupa.lua51 as lupa
    except ImportError:
        return ""
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute((Path(__file__).resolve().parents[2] / "manifests" / "argocd" / "health.lua").read_text())
    return str(result["status"])


def test_restore_puts_the_disk_back_and_deleting_cleans_the_host(kube, operator, namespace, host, boot_iso,
                                                                    conn, libvirtd) -> None:
    created_before = metric("libvirt_operator_snapshot_operations_total", operation="create", outcome="succeeded")
    timed_before = {op: metric("libvirt_operator_snapshot_operation_duration_seconds_count", operation=op)
                    for op in ("create", "restore", "delete")}
    uid = make_vm(kube, namespace, "db", host, "Halted")
    printable(kube, namespace, "db", "Stopped")
    serial = Serial(libvirtd.root / "log" / "qemu" / f"{namespace}_db-serial.log")

    # 1. A snapshot of the clean disk, VM stopped.
    clean = snapshot(kube, namespace, "clean", "db")
    obj = ready_snapshot(kube, namespace, "clean")
    st = obj["status"]
    assert st["phase"] == "Succeeded" and st["indications"] == ["Offline"] and st["sourceUid"] == uid
    assert st["host"] == host and st["creationTime"] and condition(obj, "Ready")["status"] == "True"
    assert [d["name"] for d in st["disks"]] == ["data"] and st["disks"][0]["volume"] == f"lvop-{uid}-data"
    assert st["sizeBytes"] == st["disks"][0]["allocationBytes"] > 0
    assert st["disks"][0]["capacityBytes"] == 16 * 2**20
    clean_name = f"lvop-snap-{clean['metadata']['uid']}"
    assert snapshots_on_host(conn, uid) == [clean_name]
    volume = conn.storagePoolLookupByName("default").storageVolLookupByName(f"lvop-{uid}-data").path()
    assert clean_name in qcow2_snapshots(volume)
    kube.wait_events(namespace, "clean", "SnapshotCreated")
    assert argocd_health(obj) in ("Healthy", "")

    # 2. It boots: the disk is clean, the guest writes its marker; a power cycle shows it stayed.
    set_strategy(kube, namespace, "db", "Always")
    assert DISK_MARKER_ABSENT in serial.next_boot()
    kube.patch(VM, "db", {"metadata": {"annotations": {ACTION: json.dumps({"action": "restart", "id": "r1"})}}},
               namespace)
    assert DISK_MARKER_PRESENT in serial.next_boot()

    # 3. A snapshot of the running VM (the marked disk).
    snapshot(kube, namespace, "marked", "db")
    obj = ready_snapshot(kube, namespace, "marked")
    assert obj["status"]["indications"] == ["Online"]
    assert conn.lookupByUUIDString(uid).state()[0] == RUNNING  # the guest runs on after it
    assert metric("libvirt_operator_snapshot_operations_total", operation="create",
                  outcome="succeeded") == created_before + 2

    # 4. A restore while it runs is refused with a condition; nothing changes.
    restore(kube, namespace, "back-to-clean", "db", "clean")
    obj = kube.wait_for(lambda: (o := kube.get(RESTORE, "back-to-clean", namespace)) and
                        ((o.get("status") or {}).get("error") or {}).get("code") == "RESTORE_TARGET_RUNNING" and o,
                        what="restore refused")
    ready = condition(obj, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "TargetRunning" and "runStrategy" in ready["message"]
    assert obj["status"]["complete"] is False and obj["status"]["error"]["time"]
    assert any("runbooks/restore-target-running.md" in link["url"] for link in obj["status"]["error"]["remediation"])
    assert conn.lookupByUUIDString(uid).state()[0] == RUNNING
    assert kube.get(VM, "db", namespace)["spec"]["runStrategy"] == "Always"  # never written by the operator
    assert argocd_health(obj) in ("Degraded", "")  # it needs the user (Git) to stop the VM
    # An impatient one gives up at once and never runs, not even once the VM is stopped.
    restore(kube, namespace, "impatient", "db", "marked", targetReadinessPolicy="FailImmediate")
    obj = kube.wait_for(lambda: (o := kube.get(RESTORE, "impatient", namespace)) and
                        condition(o, "Stalled") and o, what="impatient restore failed")
    assert obj["status"]["error"]["code"] == "RESTORE_TARGET_RUNNING" and "gave up" in obj["status"]["error"]["message"]

    # 5. Once stopped (in Git: runStrategy Halted) the waiting restore runs by itself.
    set_strategy(kube, namespace, "db", "Halted")
    started = time.monotonic()
    obj = complete(kube, namespace, "back-to-clean", timeout=90)
    print(f"measured: stop + restore after runStrategy Halted {time.monotonic() - started:.2f}s")
    assert obj["status"]["restoreTime"] and obj["status"]["restores"] == [{"name": "data", "target": "vda"}]
    assert condition(obj, "Ready")["status"] == "True" and "error" not in obj["status"]
    kube.wait_events(namespace, "back-to-clean", "RestoreComplete")
    assert argocd_health(obj) in ("Healthy", "")
    assert conn.lookupByUUIDString(uid).state()[0] == SHUTOFF
    impatient = kube.get(RESTORE, "impatient", namespace)["status"]
    assert impatient["complete"] is False and "restoreTime" not in impatient

    # 6. The next boot finds the disk as it was in the clean snapshot.
    set_strategy(kube, namespace, "db", "Always")
    assert DISK_MARKER_ABSENT in serial.next_boot()

    # 7. Restoring the online snapshot: the disk comes back marked, the saved memory is discarded (a fresh boot).
    set_strategy(kube, namespace, "db", "Halted")
    printable(kube, namespace, "db", "Stopped")
    started = time.monotonic()
    restore(kube, namespace, "back-to-marked", "db", "marked")
    complete(kube, namespace, "back-to-marked")
    print(f"measured: restore of the online snapshot, created to complete {time.monotonic() - started:.2f}s")
    assert conn.lookupByUUIDString(uid).state()[0] == SHUTOFF
    set_strategy(kube, namespace, "db", "Always")
    assert DISK_MARKER_PRESENT in serial.next_boot()

    # 8. Deleting a snapshot deletes it on the host, from libvirt and from the volume itself.
    started = time.monotonic()
    kube.delete(SNAP, "clean", namespace)
    kube.wait_for(lambda: kube.get(SNAP, "clean", namespace) is None, timeout=30, what="snapshot clean deleted")
    print(f"measured: snapshot deletion (VM running) to object gone {time.monotonic() - started:.2f}s")
    assert clean_name not in snapshots_on_host(conn, uid) and len(snapshots_on_host(conn, uid)) == 1
    assert clean_name not in qcow2_snapshots(volume)

    # 9. Deleting the VM takes its volumes and the snapshots inside them: the snapshot turns Failed.
    kube.delete(VM, "db", namespace)
    kube.wait_for(lambda: kube.get(VM, "db", namespace) is None, timeout=60, what="VM deleted")
    obj = kube.wait_for(lambda: (o := kube.get(SNAP, "marked", namespace)) and
                        (o.get("status") or {}).get("phase") == "Failed" and o, what="snapshot of a deleted VM Failed")
    assert obj["status"]["readyToUse"] is False
    assert obj["status"]["error"]["code"] == "SNAPSHOT_SOURCE_NOT_FOUND"
    assert not Path(volume).exists()
    kube.delete(SNAP, "marked", namespace)
    kube.wait_for(lambda: kube.get(SNAP, "marked", namespace) is None, timeout=30, what="snapshot marked deleted")

    # Every host operation was timed: 2 creates, 2 restores (+ the refused attempts), 2 deletions.
    counts = {op: metric("libvirt_operator_snapshot_operation_duration_seconds_count", operation=op) - before
              for op, before in timed_before.items()}
    assert counts["create"] >= 2 and counts["restore"] >= 3 and counts["delete"] >= 2, counts
    assert metric("libvirt_operator_snapshot_operations_total", operation="restore", outcome="refused") >= 1


def test_disks_that_cannot_be_snapshotted_are_refused_with_the_code(kube, operator, namespace, host, boot_iso,
                                                                     conn) -> None:
    refused_before = metric("libvirt_operator_snapshot_operations_total", operation="create", outcome="refused")
    # Only a cdrom: nothing to capture.
    make_vm(kube, namespace, "live-cd", host, "Halted", data_disk=False)
    printable(kube, namespace, "live-cd", "Stopped")
    snapshot(kube, namespace, "cd-only", "live-cd")
    obj = kube.wait_for(lambda: (o := kube.get(SNAP, "cd-only", namespace)) and
                        (o.get("status") or {}).get("phase") == "Failed" and o, what="cd-only refused")
    assert obj["status"]["error"]["code"] == "SNAPSHOT_UNSUPPORTED" and obj["status"]["readyToUse"] is False
    assert "no qcow2 disk" in obj["status"]["error"]["message"]
    assert condition(obj, "Stalled")["status"] == "True" and condition(obj, "Ready")["reason"] == "SnapshotUnsupported"
    assert argocd_health(obj) in ("Degraded", "")

    # A raw disk (changed on the host behind the operator's back): refused, naming the disk.
    uid = make_vm(kube, namespace, "rawdisk", host, "Halted")
    printable(kube, namespace, "rawdisk", "Stopped")
    dom = conn.lookupByUUIDString(uid)
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    conn.defineXML(xml.replace("<driver name='qemu' type='qcow2'/>", "<driver name='qemu' type='raw'/>"))
    snapshot(kube, namespace, "raw", "rawdisk")
    obj = kube.wait_for(lambda: (o := kube.get(SNAP, "raw", namespace)) and
                        (o.get("status") or {}).get("phase") == "Failed" and o, what="raw refused")
    error = obj["status"]["error"]
    assert error["code"] == "SNAPSHOT_UNSUPPORTED" and "disk data (vda)" in error["message"] and "raw" in error["message"]
    assert error["context"]["disk"] == "data"
    kube.wait_events(namespace, "raw", "SnapshotUnsupported")
    assert dom.snapshotNum(0) == 0  # nothing was taken
    assert metric("libvirt_operator_snapshot_operations_total", operation="create",
                  outcome="refused") == refused_before + 2
    for name in ("cd-only", "raw"):
        kube.delete(SNAP, name, namespace)
    kube.wait_for(lambda: kube.get(SNAP, "raw", namespace) is None and kube.get(SNAP, "cd-only", namespace) is None,
                  timeout=30, what="refused snapshots deleted")
    for name in ("live-cd", "rawdisk"):
        kube.delete(VM, name, namespace)
    kube.wait_for(lambda: kube.get(VM, "live-cd", namespace) is None and kube.get(VM, "rawdisk", namespace) is None,
                  timeout=60, what="VMs deleted")


def test_a_snapshot_applied_before_its_vm_waits_for_it_and_its_spec_is_immutable(kube, operator, namespace, host,
                                                                                 boot_iso) -> None:
    # GitOps applies objects in any order: the snapshot waits (retryable) until the VM has a domain.
    snapshot(kube, namespace, "early", "later")
    obj = kube.wait_for(lambda: (o := kube.get(SNAP, "early", namespace)) and
                        ((o.get("status") or {}).get("error") or {}).get("code") == "SNAPSHOT_SOURCE_NOT_FOUND" and o,
                        what="snapshot waiting for its VM")
    assert obj["status"]["phase"] == "InProgress" and condition(obj, "Reconciling")["status"] == "True"
    assert "does not exist" in obj["status"]["error"]["message"]
    with pytest.raises(ApiException) as refused:
        kube.patch(SNAP, "early", {"spec": {"source": {"name": "other"}}}, namespace)
    assert refused.value.status == 422 and "spec is immutable" in refused.value.body

    make_vm(kube, namespace, "later", host, "Halted")
    obj = ready_snapshot(kube, namespace, "early", timeout=90)
    assert "error" not in obj["status"] and condition(obj, "Reconciling") is None
    kube.delete(SNAP, "early", namespace)
    kube.wait_for(lambda: kube.get(SNAP, "early", namespace) is None, timeout=30, what="snapshot deleted")
    kube.delete(VM, "later", namespace)
    kube.wait_for(lambda: kube.get(VM, "later", namespace) is None, timeout=60, what="VM deleted")

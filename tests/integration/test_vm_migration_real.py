"""VirtualMachineMigration on two real libvirtd daemons (QEMU/TCG) with the session operator: a running
VM moves to the other host while its guest keeps counting (the test ISO's heartbeat variant prints a
tick a second from a counter in guest memory: the count goes on, no boot marker appears, so the guest
never restarted); its disk is copied and removed from the source; at every poll at most one copy runs.
Then a migration whose target loses power mid-copy is rolled back: the VM keeps running where it was,
with MIGRATION_FAILED and runbook links; and a migration to a cordoned host is refused."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from libvirt_operator.devenv.testiso import KERNEL_MARKER, TICK_MARKER, build_test_iso
from tests.harness.http_server import TestHTTPServer
from tests.harness.kube import Kube, condition
from tests.harness.pytest_operator import loopback_downloads
from tests.integration.test_host_failover_real import CopyWatch, defined_on, running_on, vm_status

VM, HOST, ISO, MIG = "virtualmachines", "libvirthosts", "isoimages", "virtualmachinemigrations"
_TICK = re.compile(rf"{TICK_MARKER} (\d+)")


@pytest.fixture(scope="module")
def daemons(libvirtd_factory) -> tuple[Any, Any]:
    a, b = libvirtd_factory("mig-a"), libvirtd_factory("mig-b")
    for d in (a, b):
        (d.root / "log" / "qemu").mkdir(parents=True, exist_ok=True)
    return a, b


@pytest.fixture(scope="module")
def heartbeat_iso(tmp_path_factory, test_iso) -> Any:  # test_iso: skips/fails like the other ISO tests
    path, _ = build_test_iso(tmp_path_factory.mktemp("heartbeat"), heartbeat=True)
    with TestHTTPServer(Path(path)) as srv:
        yield srv, hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def downloads(operator, tmp_path_factory):
    with loopback_downloads(operator, tmp_path_factory.mktemp("migration-iso-cache"), iso_resync_seconds=2.0) as p:
        yield p


def ticks(daemon: Any, namespace: str, name: str) -> list[int]:
    path = daemon.root / "log" / "qemu" / f"{namespace}_{name}-serial.log"
    return [int(n) for n in _TICK.findall(path.read_text(errors="replace"))] if path.exists() else []


def serial(daemon: Any, namespace: str, name: str) -> str:
    path = daemon.root / "log" / "qemu" / f"{namespace}_{name}-serial.log"
    return path.read_text(errors="replace") if path.exists() else ""


def volumes(daemon: Any) -> list[str]:
    conn = daemon.connect()
    try:
        pool = conn.storagePoolLookupByName("default")
        pool.refresh(0)
        return sorted(v.name() for v in pool.listAllVolumes())
    finally:
        conn.close()


def _cleanup_state(operator: Any, a: Any, uid: str, host: str) -> str:
    """What the operator and host A show when a stale copy was not cleaned in time (for a failure message)."""
    from libvirt_operator.handlers.vm_state import state_of

    st = state_of(operator.runtime)
    vm = st.vms.get(uid) or {}
    cached = vm.get("status") or {}
    conn = operator.runtime.pool.get(host)
    lock = st.locks.get(uid)
    return (f"operator: stale_on[{host}]={sorted(st.stale_on.get(host) or ())}, cached status.host="
            f"{cached.get('host')}, cached staleDomainHosts={cached.get('staleDomainHosts')}, "
            f"rv={(vm.get('metadata') or {}).get('resourceVersion')}, "
            f"lock held={lock is not None and lock.locked()}, host daemon={host in st.host_wake}, "
            f"connection={'none' if conn is None else ('closed' if conn.closed else f'{conn.in_flight()} in flight')}; "
            f"A: defined={defined_on(a, uid)}, volumes={[v for v in volumes(a) if uid in v]}")


def migration(kube: Kube, namespace: str, name: str, timeout: float = 120) -> dict[str, Any]:
    return kube.wait_for(lambda: (o := kube.get(MIG, name, namespace)) and
                         (o.get("status") or {}).get("phase") in ("Succeeded", "Failed") and o,
                         timeout=timeout, what=f"migration {name} done")


def test_a_running_vm_moves_live_and_a_failed_move_rolls_back(kube, kubeconfig, operator, namespace, daemons,
                                                              heartbeat_iso, downloads) -> None:
    a, b = daemons
    srv, sha = heartbeat_iso
    tag = uuid.uuid4().hex[:6]
    ha, hb = f"mig-a-{tag}", f"mig-b-{tag}"
    base = {"insecure": True, "probeIntervalSeconds": 5}
    kube.create(HOST, {"metadata": {"name": ha, "labels": {"lvop-mig": tag}}, "spec": {"uri": a.uri, **base}})
    kube.create(HOST, {"metadata": {"name": hb, "labels": {"lvop-mig": tag}},
                       "spec": {"uri": b.uri, "unschedulable": True, **base}})  # so that the VM starts on A
    try:
        for h in (ha, hb):
            kube.wait_condition(HOST, h, "Ready", "True", timeout=60)
        kube.create(ISO, {"metadata": {"name": "boot"}, "spec": {
            "source": {"url": srv.url("/image")}, "checksum": f"sha256:{sha}", "targets": {"hostNames": [ha, hb]}}},
            namespace)
        kube.wait_condition(ISO, "boot", "Ready", "True", namespace=namespace, timeout=120)
        uid = kube.create(VM, {"metadata": {"name": "web"}, "spec": {
            "hostSelector": {"matchLabels": {"lvop-mig": tag}}, "memory": "64Mi", "domainType": "qemu",
            "terminationGracePeriodSeconds": 1,
            "disks": [{"name": "cd", "bootOrder": 1, "cdrom": {"isoImageRef": {"name": "boot"}}},
                      {"name": "data", "volume": {"size": "16Mi"}}]}}, namespace)["metadata"]["uid"]
        running_on(kube, namespace, "web", ha)
        kube.wait_for(lambda: len(ticks(a, namespace, "web")) >= 2, timeout=60, what="the guest ticking on A")

        # Refused: the only other host is cordoned. Nothing moves.
        kube.create(MIG, {"metadata": {"name": "to-cordoned"}, "spec": {"vmName": "web", "targetHost": hb}},
                    namespace)
        refused = migration(kube, namespace, "to-cordoned")["status"]
        assert refused["phase"] == "Failed" and refused["error"]["code"] == "MIGRATION_FAILED"
        assert "cordoned" in refused["error"]["message"] and refused["error"]["remediation"]
        kube.patch(HOST, hb, {"spec": {"unschedulable": False}})

        # The move: the target is chosen (the only other host), the guest keeps counting.
        watch = CopyWatch((a, b), uid)
        kube.create(MIG, {"metadata": {"name": "move"}, "spec": {"vmName": "web"}}, namespace)
        done = migration(kube, namespace, "move")
        st = done["status"]
        assert st["phase"] == "Succeeded", st
        assert (st["sourceHost"], st["targetHost"], st["vmUid"]) == (ha, hb, uid)
        assert st["startTime"] and st["endTime"] and condition(done, "Ready")["status"] == "True"
        print(f"measured: migration {st['startTime']} -> {st['endTime']}, downtime {st.get('downtimeMs')} ms")
        running_on(kube, namespace, "web", hb, timeout=30)
        last_on_a = ticks(a, namespace, "web")[-1]
        kube.wait_for(lambda: (t := ticks(b, namespace, "web")) and t[-1] > last_on_a + 1, timeout=30,
                      what="the guest ticking on B past its last tick on A")
        assert KERNEL_MARKER not in serial(b, namespace, "web")  # it never booted on B: it moved
        assert not defined_on(a, uid) and defined_on(b, uid)
        assert f"lvop-{uid}-data" not in volumes(a) and f"lvop-{uid}-data" in volumes(b)
        assert not vm_status(kube, namespace, "web").get("migrationTargetHost")
        assert watch.stop() == 1
        kube.wait_events(namespace, "web", "MigrationStarted", "Migrated")

        # Rolled back: A loses power during a slow copy back; the VM keeps running on B.
        watch = CopyWatch((a, b), uid)
        kube.create(MIG, {"metadata": {"name": "back"}, "spec": {"vmName": "web", "targetHost": ha,
                                                                  "bandwidthMibPerSecond": 1}}, namespace)
        kube.wait_for(lambda: ((kube.get(MIG, "back", namespace) or {}).get("status") or {}).get("phase")
                      == "Running", timeout=60, what="the copy back running")
        a.power_off()
        failed = migration(kube, namespace, "back")["status"]
        assert failed["phase"] == "Failed" and failed["error"]["code"] == "MIGRATION_FAILED", failed
        assert "keeps running on its host" in failed["error"]["message"]
        assert vm_status(kube, namespace, "web")["host"] == hb
        before = ticks(b, namespace, "web")[-1]
        kube.wait_for(lambda: ticks(b, namespace, "web")[-1] > before + 1, timeout=30, what="still ticking on B")
        # What the copy had created on A could not be taken back: A is recorded, and cleaned once it answers.
        assert vm_status(kube, namespace, "web")["staleDomainHosts"] == [ha]
        a.start()
        kube.wait_condition(HOST, ha, "Ready", "True", timeout=90)
        try:
            kube.wait_for(lambda: not vm_status(kube, namespace, "web").get("staleDomainHosts"), timeout=60,
                          what="the leftover on A removed")
        except AssertionError as err:
            raise AssertionError(f"{err}; {_cleanup_state(operator, a, uid, ha)}") from None
        assert not defined_on(a, uid) and f"lvop-{uid}-data" not in volumes(a)
        assert watch.stop() == 1
        assert running_on(kube, namespace, "web", hb, timeout=30)

        # Drain B (the CLI, with the user's kubeconfig): cordoned, and the VM moves live to A (once the
        # ISOImage is Ready on A again: its volume is checked after the power cycle).
        kube.wait_for(lambda: any(h.get("host") == ha and h.get("phase") == "Ready" for h in
                                  ((kube.get(ISO, "boot", namespace) or {}).get("status") or {}).get("hosts") or []),
                      timeout=60, what="the ISOImage Ready on A again")
        watch = CopyWatch((a, b), uid)
        out = subprocess.run([sys.executable, "-m", "libvirt_operator", "drain", hb, "--wait", "--timeout", "120",
                              "--kubeconfig", str(kubeconfig)], capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"LibvirtHost {hb} cordoned" in out.stdout and "Succeeded" in out.stdout
        assert kube.get(HOST, hb)["spec"]["unschedulable"] is True
        running_on(kube, namespace, "web", ha, timeout=30)
        assert watch.stop() == 1 and not defined_on(b, uid)

        # Aborted at its timeout (a copy too slow to finish): rolled back, nothing left on the live target.
        kube.patch(HOST, hb, {"spec": {"unschedulable": False}})
        kube.create(MIG, {"metadata": {"name": "slow"}, "spec": {"vmName": "web", "targetHost": hb,
                                                                  "bandwidthMibPerSecond": 1, "timeoutSeconds": 10}},
                    namespace)
        slow = migration(kube, namespace, "slow")["status"]
        assert slow["phase"] == "Failed" and slow["error"]["code"] == "MIGRATION_FAILED", slow
        assert "aborted" in slow["error"]["message"]
        assert vm_status(kube, namespace, "web")["host"] == ha and not defined_on(b, uid)
        assert not [v for v in volumes(b) if uid in v]
        before = ticks(a, namespace, "web")[-1]
        kube.wait_for(lambda: ticks(a, namespace, "web")[-1] > before + 1, timeout=30, what="still ticking on A")
    finally:
        if kube.get(VM, "web", namespace):
            kube.delete(VM, "web", namespace)
        kube.wait_for(lambda: not kube.get(VM, "web", namespace), timeout=90, what="VM deleted")
        if kube.get(ISO, "boot", namespace):
            kube.delete(ISO, "boot", namespace)
            kube.wait_for(lambda: kube.get(ISO, "boot", namespace) is None, timeout=60, what="ISO deleted")
        for h in (ha, hb):
            kube.delete(HOST, h)


def test_an_operator_down_while_libvirt_switched_finds_the_vm_on_the_target(kube, operator, namespace, daemons,
                                                                            heartbeat_iso, downloads) -> None:
    """kill -9 after libvirt switched and before status.host was written: status says the source, with
    migrationTargetHost set (written before every copy). The restarted operator must find the domain on
    the target, never define it again on the source."""
    from libvirt_operator.adapters.libvirt import migration as lvmig
    from libvirt_operator.adapters.libvirt.domain_xml import disk_devices
    from tests.harness.kube import GROUP, VERSION

    a, b = daemons
    srv, sha = heartbeat_iso
    tag = uuid.uuid4().hex[:6]
    ha, hb = f"mig2-a-{tag}", f"mig2-b-{tag}"
    hosts = {ha: a, hb: b}
    for h, d in hosts.items():
        kube.create(HOST, {"metadata": {"name": h, "labels": {"lvop-mig2": tag}},
                           "spec": {"uri": d.uri, "insecure": True, "probeIntervalSeconds": 5}})
    try:
        for h in hosts:
            kube.wait_condition(HOST, h, "Ready", "True", timeout=60)
        kube.create(ISO, {"metadata": {"name": "boot2"}, "spec": {
            "source": {"url": srv.url("/image")}, "checksum": f"sha256:{sha}", "targets": {"hostNames": [ha, hb]}}},
            namespace)
        kube.wait_condition(ISO, "boot2", "Ready", "True", namespace=namespace, timeout=120)
        uid = kube.create(VM, {"metadata": {"name": "db"}, "spec": {
            "hostSelector": {"matchLabels": {"lvop-mig2": tag}}, "memory": "64Mi", "domainType": "qemu",
            "disks": [{"name": "cd", "bootOrder": 1, "cdrom": {"isoImageRef": {"name": "boot2"}}},
                      {"name": "data", "volume": {"size": "16Mi"}}]}}, namespace)["metadata"]["uid"]
        st = kube.wait_for(lambda: (s := vm_status(kube, namespace, "db")).get("printableStatus") == "Running" and s,
                           timeout=90, what="db Running")
        source = st["host"]
        target = hb if source == ha else ha
        src, dst = hosts[source], hosts[target]
        kube.wait_for(lambda: len(ticks(src, namespace, "db")) >= 2, timeout=60, what="ticking on the source")

        operator.stop()
        try:
            kube.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, VM, "db",
                                                              {"status": {"migrationTargetHost": target}})
            sc, dc = src.connect(), dst.connect()
            try:
                devs = disk_devices(sc.lookupByUUIDString(uid).XMLDesc(0))
                iso_name = Path(devs["cd"][1]).name
                lvmig.migrate_live(sc, dc, uid, dst.uri, copy_disks=[lvmig.DiskCopy(devs["data"][0], "default")],
                                   readonly_paths={devs["cd"][0]: str(dst.pool_path / iso_name)})
            finally:
                sc.close()
                dc.close()
        finally:
            operator.start()
        running_on(kube, namespace, "db", target, timeout=60)
        assert not vm_status(kube, namespace, "db").get("migrationTargetHost")
        assert not defined_on(src, uid) and defined_on(dst, uid)
        assert KERNEL_MARKER not in serial(dst, namespace, "db")  # moved, never booted again
    finally:
        if kube.get(VM, "db", namespace):
            kube.delete(VM, "db", namespace)
        kube.wait_for(lambda: not kube.get(VM, "db", namespace), timeout=90, what="VM deleted")
        if kube.get(ISO, "boot2", namespace):
            kube.delete(ISO, "boot2", namespace)
            kube.wait_for(lambda: kube.get(ISO, "boot2", namespace) is None, timeout=60, what="ISO deleted")
        for h in hosts:
            kube.delete(HOST, h)

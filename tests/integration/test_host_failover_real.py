"""hostFailurePolicy on two real libvirtd daemons (QEMU/TCG) sharing one storage pool, with the session
operator: a host loses power, is declared out of service, its VM is recreated on the other host with the
same disk (the guest finds the marker it wrote before), and when the host boots again its stale copy is
removed before anything else; at every poll, at most one copy of the VM runs. Then the other direction on
a host that still answers (its copy is powered off first), a VM whose disk cannot follow (it waits,
and says which disk), and hostRef + Recreate refused by the CRD.

The test guest (tests/harness/test_iso.py) reports at every boot whether its virtio disk holds its marker,
then writes it: so a boot on the new host shows which disk it got."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

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

VM, HOST, ISO = "virtualmachines", "libvirthosts", "isoimages"


@pytest.fixture(scope="module")
def daemons(libvirtd_factory, tmp_path_factory) -> tuple[Any, Any, Path]:
    """Two daemons, each with the pool `shared` on one directory (storage both hosts see)."""
    shared = tmp_path_factory.mktemp("shared-pool")
    a, b = libvirtd_factory("fail-a"), libvirtd_factory("fail-b")
    for d in (a, b):
        (d.root / "log" / "qemu").mkdir(parents=True, exist_ok=True)
        conn = d.connect()
        try:
            pool = conn.storagePoolDefineXML(
                f"<pool type='dir'><name>shared</name><target><path>{shared}</path></target></pool>", 0)
            pool.create(0)
            pool.setAutostart(1)
        finally:
            conn.close()
    return a, b, shared


@pytest.fixture(scope="module")
def iso_server(test_iso):
    with TestHTTPServer(Path(test_iso.path)) as srv:
        yield srv, hashlib.sha256(Path(test_iso.path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def downloads(operator, tmp_path_factory):
    with loopback_downloads(operator, tmp_path_factory.mktemp("failover-iso-cache"), iso_resync_seconds=2.0) as p:
        yield p


def running_copies(daemon: Any, uid: str) -> int | None:
    """1 if the daemon runs the domain of this UUID (state running: a paused domain, such as the incoming
    side of a live migration, executes nothing), 0 if not, None if the daemon does not answer."""
    try:
        conn = libvirt.open(daemon.uri)
    except libvirt.libvirtError:
        return None
    try:
        try:
            return 1 if conn.lookupByUUIDString(uid).state()[0] == libvirt.VIR_DOMAIN_RUNNING else 0
        except libvirt.libvirtError:
            return 0
    finally:
        conn.close()


def defined_on(daemon: Any, uid: str) -> bool:
    conn = daemon.connect()
    try:
        conn.lookupByUUIDString(uid)
        return True
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


class CopyWatch:
    """Polls both daemons every 0.2 s: the most copies of the VM seen running at once."""

    def __init__(self, daemons: tuple[Any, Any], uid: str) -> None:
        self.daemons, self.uid = daemons, uid
        self.most, self.polls, self._stop = 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            counts = [running_copies(d, self.uid) for d in self.daemons]
            self.most = max(self.most, sum(c or 0 for c in counts))
            self.polls += 1
            time.sleep(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        return self.most


def vm_status(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    return (kube.get(VM, name, namespace) or {}).get("status") or {}


def running_on(kube: Kube, namespace: str, name: str, host: str, timeout: float = 120) -> dict[str, Any]:
    return kube.wait_for(lambda: (s := vm_status(kube, namespace, name)).get("host") == host
                         and s.get("printableStatus") == "Running" and s, timeout=timeout,
                         what=f"{name} Running on {host}")


def make_vm(kube: Kube, namespace: str, name: str, tag: str, data_pool: str) -> str:
    return kube.create(VM, {"metadata": {"name": name}, "spec": {
        "hostSelector": {"matchLabels": {"lvop-failover": tag}}, "hostFailurePolicy": "Recreate",
        "memory": "64Mi", "domainType": "qemu", "runStrategy": "Always", "terminationGracePeriodSeconds": 1,
        "disks": [{"name": "cd", "bootOrder": 1, "cdrom": {"isoImageRef": {"name": "boot"}}},
                  {"name": "data", "volume": {"size": "16Mi", "pool": data_pool}}]}}, namespace)["metadata"]["uid"]


def test_hostref_with_recreate_is_refused_by_the_crd(kube, namespace) -> None:
    with pytest.raises(ApiException) as err:
        kube.create(VM, {"metadata": {"name": "pinned"}, "spec": {"hostRef": "somewhere",
                                                                 "hostFailurePolicy": "Recreate"}}, namespace)
    assert err.value.status == 422 and "hostFailurePolicy Recreate needs hostSelector" in err.value.body


def test_a_fenced_host_s_vm_runs_on_the_other_host_with_its_disk_and_one_copy_at_every_poll(
        kube, operator, namespace, daemons, iso_server, downloads) -> None:
    a, b, _shared = daemons
    srv, sha = iso_server
    tag = uuid.uuid4().hex[:6]
    ha, hb = f"fail-a-{tag}", f"fail-b-{tag}"
    base = {"insecure": True, "probeIntervalSeconds": 5, "sharedPools": ["shared"]}
    kube.create(HOST, {"metadata": {"name": ha, "labels": {"lvop-failover": tag}}, "spec": {"uri": a.uri, **base}})
    # Cordoned at first, so that both VMs start on A.
    kube.create(HOST, {"metadata": {"name": hb, "labels": {"lvop-failover": tag}},
                       "spec": {"uri": b.uri, "unschedulable": True, **base}})
    try:
        for h in (ha, hb):
            kube.wait_condition(HOST, h, "Ready", "True", timeout=60)
        kube.create(ISO, {"metadata": {"name": "boot"}, "spec": {
            "source": {"url": srv.url("/image")}, "checksum": f"sha256:{sha}",
            "targets": {"hostNames": [ha, hb]}}}, namespace)
        kube.wait_condition(ISO, "boot", "Ready", "True", namespace=namespace, timeout=120)

        web = make_vm(kube, namespace, "web", tag, "shared")      # its disk can follow
        local = make_vm(kube, namespace, "local", tag, "default")  # its disk is on A only
        running_on(kube, namespace, "web", ha)
        running_on(kube, namespace, "local", ha)
        serial_a = Serial(a.root / "log" / "qemu" / f"{namespace}_web-serial.log")
        assert DISK_MARKER_ABSENT in serial_a.next_boot()
        kube.patch(HOST, hb, {"spec": {"unschedulable": False}})

        # A loses power. Unreachable alone never moves a VM: its QEMU might still run.
        a.power_off()
        kube.wait_for(lambda: condition(kube.get(HOST, ha), "Ready")["status"] == "False", timeout=60,
                      what=f"{ha} NotReady")
        time.sleep(8)
        assert vm_status(kube, namespace, "web").get("host") == ha

        # Declared out of service (the fence): web is recreated on B, with the disk it wrote on A.
        fenced_at = time.monotonic()
        kube.patch(HOST, ha, {"spec": {"outOfService": True}})
        st = running_on(kube, namespace, "web", hb)
        print(f"measured: out of service to Running on the other host {time.monotonic() - fenced_at:.1f}s")
        assert st["staleDomainHosts"] == [ha]
        assert DISK_MARKER_PRESENT in Serial(b.root / "log" / "qemu" / f"{namespace}_web-serial.log").next_boot()
        kube.wait_events(namespace, "web", "HostOutOfService")

        # The VM whose disk is local to A waits, and says which disk cannot follow.
        st = kube.wait_for(lambda: (s := vm_status(kube, namespace, "local")).get("error", {}).get("code")
                           == "HOST_OUT_OF_SERVICE" and s, timeout=60, what="local: HOST_OUT_OF_SERVICE")
        assert st["host"] == ha and "disk data (pool default) cannot follow it" in st["error"]["message"]
        assert condition(kube.get(VM, "local", namespace), "Ready")["reason"] == "HostOutOfService"

        # A boots again: its stale copy of web goes first; at no poll do two copies run.
        watch = CopyWatch((a, b), web)
        a.start()
        kube.wait_for(lambda: not vm_status(kube, namespace, "web").get("staleDomainHosts"), timeout=90,
                      what="the stale copy on A removed")
        assert not defined_on(a, web)
        kube.wait_events(namespace, "web", "StaleCopyRemoved")
        # The VM that waits is not started on A while A is out of service (the domain is reported as it is).
        time.sleep(2)
        st = vm_status(kube, namespace, "local")
        assert st["host"] == ha and st["printableStatus"] == "Stopped" and st["error"]["code"] == "HOST_OUT_OF_SERVICE"
        assert running_copies(a, local) == 0
        assert watch.stop() == 1 and watch.polls > 10
        assert vm_status(kube, namespace, "web")["host"] == hb and running_copies(b, web) == 1

        # A back in service: the VM that waited runs there again.
        kube.patch(HOST, ha, {"spec": {"outOfService": False}})
        running_on(kube, namespace, "local", ha)

        # The other direction, on a host that still answers: B's copy is powered off before A starts one.
        watch = CopyWatch((a, b), web)
        kube.patch(HOST, hb, {"spec": {"outOfService": True}})
        st = running_on(kube, namespace, "web", ha)
        assert not st.get("staleDomainHosts")  # B answered: nothing left behind to remove later
        assert not defined_on(b, web)
        assert DISK_MARKER_PRESENT in serial_a.next_boot()  # its second boot on A: the disk went both ways
        assert watch.stop() == 1
        assert vm_status(kube, namespace, "local")["host"] == ha and local
    finally:
        for name in ("web", "local"):
            if kube.get(VM, name, namespace):
                kube.delete(VM, name, namespace)
        kube.wait_for(lambda: not kube.get(VM, "web", namespace) and not kube.get(VM, "local", namespace),
                      timeout=90, what="VMs deleted")
        if kube.get(ISO, "boot", namespace):
            kube.delete(ISO, "boot", namespace)
            kube.wait_for(lambda: kube.get(ISO, "boot", namespace) is None, timeout=60, what="ISO deleted")
        for h in (ha, hb):
            kube.delete(HOST, h)

"""kill -9 of the operator (a separate process, on a private control plane) in the middle of a live
migration between two real libvirtd daemons. Whatever libvirt then does with the job (finish it or
roll it back), the restarted operator must end with the VM on the host libvirt has it on, running
there once, with no second copy at any poll, and the migration object not left Running."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirt_operator.devenv.testiso import build_test_iso
from tests.harness.http_server import TestHTTPServer
from tests.harness.kube import Kube
from tests.harness.operator_process import OperatorProcess
from tests.integration.test_host_failover_real import CopyWatch, defined_on, running_copies
from tests.integration.test_vm_migration_real import ticks

VM, HOST, ISO, MIG = "virtualmachines", "libvirthosts", "isoimages", "virtualmachinemigrations"


@pytest.fixture
def operator_process(private_cp, tmp_path) -> Iterator[OperatorProcess]:
    op = OperatorProcess(private_cp.kubeconfig_path, tmp_path, extra_args=(
        "--download-allow", "127.0.0.0/8", "--iso-cache-dir", str(tmp_path / "iso-cache"))).start()
    yield op
    op.kill()


def test_kill_9_during_a_migration_leaves_one_running_copy_where_libvirt_has_it(
        private_cp, operator_process, libvirtd_factory, test_iso, tmp_path) -> None:
    kube = Kube(private_cp.kubeconfig_path)
    a, b = libvirtd_factory("kill-a"), libvirtd_factory("kill-b")
    for d in (a, b):
        (d.root / "log" / "qemu").mkdir(parents=True, exist_ok=True)
    iso, _ = build_test_iso(tmp_path / "iso", heartbeat=True)
    tag = uuid.uuid4().hex[:6]
    ha, hb = f"kill-a-{tag}", f"kill-b-{tag}"
    daemon_of = {ha: a, hb: b}
    ns = kube.new_namespace("killmig")
    with TestHTTPServer(Path(iso)) as srv:
        for h, d in daemon_of.items():
            kube.create(HOST, {"metadata": {"name": h, "labels": {"lvop-kill": tag}}, "spec": {
                "uri": d.uri, "insecure": True, "probeIntervalSeconds": 5, "unschedulable": h == hb}})
        for h in daemon_of:
            kube.wait_condition(HOST, h, "Ready", "True", timeout=60)
        kube.create(ISO, {"metadata": {"name": "boot"}, "spec": {
            "source": {"url": srv.url("/image")}, "checksum": f"sha256:{hashlib.sha256(Path(iso).read_bytes()).hexdigest()}",
            "targets": {"hostNames": [ha, hb]}}}, ns)
        kube.wait_condition(ISO, "boot", "Ready", "True", namespace=ns, timeout=120)
    uid = kube.create(VM, {"metadata": {"name": "web"}, "spec": {
        "hostSelector": {"matchLabels": {"lvop-kill": tag}}, "memory": "64Mi", "domainType": "qemu",
        "disks": [{"name": "cd", "bootOrder": 1, "cdrom": {"isoImageRef": {"name": "boot"}}},
                  {"name": "data", "volume": {"size": "16Mi"}}]}}, ns)["metadata"]["uid"]
    kube.wait_for(lambda: ((kube.get(VM, "web", ns) or {}).get("status") or {}).get("printableStatus") == "Running",
                  timeout=90, what="web Running")
    kube.patch(HOST, hb, {"spec": {"unschedulable": False}})

    watch = CopyWatch((a, b), uid)
    kube.create(MIG, {"metadata": {"name": "move"}, "spec": {"vmName": "web", "bandwidthMibPerSecond": 1}}, ns)
    kube.wait_for(lambda: (((kube.get(MIG, "move", ns) or {}).get("status") or {}).get("progress") or {})
                  .get("dataProcessedBytes", 0) > 0, timeout=60, what="the copy under way")
    operator_process.kill()
    time.sleep(2)
    operator_process.start()

    def settled():
        vm = kube.get(VM, "web", ns) or {}
        st = vm.get("status") or {}
        mig = ((kube.get(MIG, "move", ns) or {}).get("status") or {}).get("phase")
        if st.get("migrationTargetHost") or st.get("printableStatus") != "Running" or mig == "Running":
            return None
        return st
    st = kube.wait_for(settled, timeout=180, what=f"the VM settled after the kill\n{operator_process.tail()}")
    host = st["host"]
    other = hb if host == ha else ha
    assert running_copies(daemon_of[host], uid) == 1
    assert not defined_on(daemon_of[other], uid) or running_copies(daemon_of[other], uid) == 0
    time.sleep(3)  # a few more polls of both daemons
    assert watch.stop() == 1
    assert not defined_on(daemon_of[other], uid)
    before = ticks(daemon_of[host], ns, "web")[-1]
    kube.wait_for(lambda: ticks(daemon_of[host], ns, "web")[-1] > before, timeout=30, what="still ticking")
    print(f"measured: after kill -9 mid-migration the VM settled on {'the target' if host == hb else 'the source'}")
    kube.delete(VM, "web", ns)
    kube.wait_for(lambda: kube.get(VM, "web", ns) is None, timeout=90, what="VM deleted")
    assert not defined_on(a, uid) and not defined_on(b, uid)

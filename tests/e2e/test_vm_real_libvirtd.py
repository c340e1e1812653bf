"""A VirtualMachine on a real libvirtd (QEMU/TCG): runs, reports Ready, reacts to lifecycle events,
and its deletion removes the domain and the operator's volumes from the host."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.harness.kube import condition
from tests.harness.libvirt_module import libvirt

pytestmark = pytest.mark.e2e
VM = "virtualmachines"


def test_blank_disk_vm_runs_and_delete_cleans_the_host(kube, operator, namespace, libvirtd) -> None:
    host = f"real-{uuid.uuid4().hex[:6]}"
    # A real host has /var/log/libvirt/qemu (the package creates it); the harness's fresh log dir does not.
    (libvirtd.root / "log" / "qemu").mkdir(parents=True, exist_ok=True)
    kube.create("libvirthosts", {"metadata": {"name": host}, "spec": {"uri": libvirtd.uri, "insecure": True}})
    kube.wait_condition("libvirthosts", host, "Ready", "True", timeout=60)

    vm = kube.create(VM, {"metadata": {"name": "tiny"}, "spec": {
        "hostRef": host, "cpu": 1, "memory": "96Mi", "domainType": "qemu",
        "disks": [{"name": "root", "bootOrder": 1, "volume": {"size": "64Mi"}}],
        "interfaces": [{"name": "nic0", "type": "user"}]}}, namespace)
    uid = vm["metadata"]["uid"]
    dname = f"{namespace}_tiny"

    obj = kube.wait_condition(VM, "tiny", "Ready", "True", namespace=namespace, timeout=60)
    assert obj["status"]["printableStatus"] == "Running"
    assert obj["status"]["domainType"] == "qemu" and obj["status"]["domainUUID"] == uid
    assert obj["status"]["interfaces"][0]["name"] == "nic0" and obj["status"]["interfaces"][0].get("mac")

    conn = libvirt.open(libvirtd.uri)
    try:
        dom = conn.lookupByUUIDString(uid)
        assert dom.name() == dname and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        xml = dom.XMLDesc(0)
        assert "<lvop:uid>" + uid in xml and "-serial.log" in xml
        pool = conn.storagePoolLookupByName("default")
        pool.refresh(0)
        vol = pool.storageVolLookupByName(f"lvop-{uid}-root")
        assert vol.path().startswith(str(libvirtd.pool_path))
        assert "qcow2" in vol.XMLDesc(0)
        serial_log = libvirtd.root / "log" / "qemu" / f"{dname}-serial.log"
        kube.wait_for(serial_log.exists, timeout=10, what="serial log on the host")

        # A lifecycle event (QEMU powered off from outside) refreshes the status promptly.
        t0 = time.monotonic()
        dom.destroy()
        kube.wait_for(lambda: (kube.get(VM, "tiny", namespace)["status"].get("startFailure") or {})
                      .get("consecutiveFailCount") == 1, timeout=10, what="crash noticed")
        assert time.monotonic() - t0 < 3.0, "the status was not refreshed by the lifecycle event"
        kube.wait_condition(VM, "tiny", "Ready", "True", namespace=namespace, timeout=30)  # restarted after 10 s

        # Halted: the guest (no OS: it ignores the ACPI button) gets its grace period, then is powered off.
        kube.patch(VM, "tiny", {"spec": {"runStrategy": "Halted", "terminationGracePeriodSeconds": 2}}, namespace)
        obj = kube.wait_for(lambda: (o := kube.get(VM, "tiny", namespace))["status"].get("printableStatus")
                            == "Stopped" and o, timeout=20, what="stopped after the grace period")
        assert condition(obj, "Ready")["status"] == "True" and condition(obj, "Ready")["reason"] == "Stopped"
        assert "startFailure" not in obj["status"] and "stopRequestedTime" not in obj["status"]
        assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
        kube.wait_events(namespace, "tiny", "ShuttingDown", "Stopped")

        kube.delete(VM, "tiny", namespace)
        kube.wait_for(lambda: kube.get(VM, "tiny", namespace) is None, timeout=60, what="VM deleted")
        assert dname not in [d.name() for d in conn.listAllDomains()]
        pool.refresh(0)
        assert f"lvop-{uid}-root" not in pool.listVolumes()
    finally:
        conn.close()
        kube.delete("libvirthosts", host)


def test_vm_boots_an_isoimage_and_its_serial_output_is_readable_on_the_host(
        kube, operator, namespace, libvirtd, test_iso, iso_downloads) -> None:
    import hashlib

    from tests.harness.http_server import TestHTTPServer

    (libvirtd.root / "log" / "qemu").mkdir(parents=True, exist_ok=True)
    host = f"boot-{uuid.uuid4().hex[:6]}"
    kube.create("libvirthosts", {"metadata": {"name": host}, "spec": {"uri": libvirtd.uri, "insecure": True}})
    kube.wait_condition("libvirthosts", host, "Ready", "True", timeout=60)
    sha = hashlib.sha256(test_iso.path.read_bytes()).hexdigest()
    with TestHTTPServer(test_iso.path) as http:
        # The VM first: it waits for its media, then boots as soon as the ISOImage is Ready.
        kube.create(VM, {"metadata": {"name": "boot"}, "spec": {
            "hostRef": host, "memory": "64Mi", "domainType": "qemu",
            "disks": [{"name": "media", "bootOrder": 1, "cdrom": {"isoImageRef": {"name": "bootiso"}}}]}}, namespace)
        kube.wait_for(lambda: (kube.get(VM, "boot", namespace).get("status") or {}).get("printableStatus")
                      == "WaitingForMedia", timeout=30, what="WaitingForMedia")
        kube.create("isoimages", {"kind": "ISOImage", "metadata": {"name": "bootiso"}, "spec": {
            "source": {"url": http.url("/image")}, "checksum": f"sha256:{sha}",
            "targets": {"hostNames": [host]}}}, namespace)
        obj = kube.wait_condition(VM, "boot", "Ready", "True", namespace=namespace, timeout=90)
    dname = obj["status"]["domainName"]
    serial_log = libvirtd.root / "log" / "qemu" / f"{dname}-serial.log"
    kube.wait_for(lambda: serial_log.exists() and all(m in serial_log.read_text(errors="replace")
                                                      for m in test_iso.markers),
                  timeout=20, what="boot markers on the serial log")
    kube.delete(VM, "boot", namespace)
    kube.wait_for(lambda: kube.get(VM, "boot", namespace) is None, timeout=60, what="VM deleted")
    conn = libvirt.open(libvirtd.uri)
    try:
        assert dname not in [d.name() for d in conn.listAllDomains()]
        pool = conn.storagePoolLookupByName("default")
        pool.refresh(0)
        iso_volumes = [e["volume"] for e in kube.get("isoimages", "bootiso", namespace)["status"]["hosts"]]
        assert set(iso_volumes) <= set(pool.listVolumes())  # the ISOImage's volume is not the VM's to delete
    finally:
        conn.close()
        kube.delete("isoimages", "bootiso", namespace)
        kube.delete("libvirthosts", host)

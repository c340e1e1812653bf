"""reconcile.vm against a libvirt test-driver host, without Kubernetes: install media resolution,
idempotence, redefinition, and a teardown that keeps what the operator did not create."""

from __future__ import annotations

import asyncio
import uuid
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from libvirt_operator.adapters.libvirt import ConnectOptions, HostPool
from libvirt_operator.adapters.libvirt.volumes import volume_name as iso_volume_name
from libvirt_operator.core.errors import ErrorCode
from libvirt_operator.core.settings import Settings
from libvirt_operator.reconcile.runtime import Runtime
from libvirt_operator.reconcile.vm import sync_vm
from libvirt_operator.reconcile.vm_delete import delete_vm
from libvirt_operator.reconcile.vm_types import ClusterView

try:
    import libvirt
except ImportError:
    libvirt = None


def host_obj(name: str, uri: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"uri": uri},
            "status": {"conditions": [{"type": "Ready", "status": "True"}], "capacity": {"cpus": 8, "memory": "8Gi"},
                       "allocated": {"cpus": 0, "memory": "0"}, "domainTypes": ["test"]}}


ISO_SHA = "sha256:" + "5e" * 32
ISO_VOLUME = iso_volume_name("ns", "debian", ISO_SHA)  # what the importer names ISOImage ns/debian


def iso_obj(phase: str) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": "debian"}, "spec": {"checksum": ISO_SHA},
            "status": {"hosts": [{"host": "h", "phase": phase, "pool": "default", "volume": ISO_VOLUME}]}}


@pytest.fixture
async def setup(test_host_factory):
    uri = test_host_factory("recon", cpus=8, memory_mib=8192)
    pool = HostPool()
    conn = await pool.ensure("h", ConnectOptions(uri=uri))
    rt = Runtime(settings=Settings(knowledge_base_enabled=False), pool=pool, kube=None)  # type: ignore[arg-type]
    yield rt, conn, uri
    await pool.close_all()


def vm_body(uid: str, status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    spec = {"hostRef": "h", "memory": "128Mi",
            "disks": [{"name": "root", "volume": {"size": "1Gi"}},
                      {"name": "media", "bootOrder": 1, "cdrom": {"isoImageRef": {"name": "debian"}}}], **spec}
    return {"metadata": {"namespace": "ns", "name": "inst", "uid": uid, "generation": 1}, "spec": spec,
            "status": status or {}}


async def test_media_wait_then_define_idempotently_then_teardown_keeps_the_iso(setup) -> None:
    rt, conn, uri = setup
    uid = str(uuid.uuid4())

    def make_iso(c):
        pool = c.storagePoolLookupByName("default")
        return pool.createXML(f"<volume><name>{ISO_VOLUME}</name><capacity unit='bytes'>1048576</capacity>"
                              "<target><format type='raw'/></target></volume>", 0).path()

    iso_path = await conn.call("make-iso", make_iso)
    isos: dict[str, Any] = {}
    view = ClusterView(hosts={"h": host_obj("h", uri)}, iso=lambda ns, name: isos.get(name))

    out = await sync_vm(vm_body(uid), rt, view)
    assert out.error is not None and out.error.code is ErrorCode.ISO_NOT_FOUND and out.retry
    assert out.status["printableStatus"] == "WaitingForMedia"
    assert any(e[:2] == ("Normal", "WaitingForMedia") for e in out.events)  # expected waiting: no Warning

    isos["debian"] = iso_obj("Uploading")
    out = await sync_vm(vm_body(uid, out.status), rt, view)
    assert out.status["printableStatus"] == "WaitingForMedia" and "not Ready on LibvirtHost h" in out.error.message
    assert not [e for e in out.events if e[1] == "ISONotFound"]  # same error: no second Event

    isos["debian"] = iso_obj("Ready")
    out = await sync_vm(vm_body(uid, out.status), rt, view)
    assert out.error is None, out.error
    assert out.status["printableStatus"] == "Running" and "error" not in out.status
    assert {e[1] for e in out.events} >= {"VolumesCreated", "Started"}
    assert [e[2] for e in out.events if e[1] == "Started"] == ["domain ns_inst defined and started on h"]
    xml = await conn.call("xml", lambda c: c.lookupByUUIDString(uid).XMLDesc(0))
    root = ET.fromstring(xml)
    cdrom = root.find("devices/disk[@device='cdrom']")
    assert cdrom.find("source").get("file") == iso_path and cdrom.find("boot").get("order") == "1"
    disk = root.find("devices/disk[@device='disk']")
    assert disk.find("source").get("file").endswith(f"/lvop-{uid}-root")

    # Nothing changed: no define, no start, no events, same status.
    again = await sync_vm(vm_body(uid, out.status), rt, view)
    assert again.events == [] and again.error is None
    assert {k: v for k, v in again.status.items() if k != "conditions"} == \
        {k: v for k, v in out.status.items() if k != "conditions"}

    # A spec change while running: redefined, RestartRequired.
    body = vm_body(uid, out.status, cpu=3)
    body["metadata"]["generation"] = 2
    changed = await sync_vm(body, rt, view)
    assert "Redefined" in {e[1] for e in changed.events} and "RestartRequired" in {e[1] for e in changed.events}
    cond = {c["type"]: c for c in changed.status["conditions"]}
    assert cond["RestartRequired"]["status"] == "True" and changed.status["observedGeneration"] == 2
    inactive = await conn.call("xml", lambda c: c.lookupByUUIDString(uid).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert ET.fromstring(inactive).findtext("vcpu") == "3"

    gone = await delete_vm(vm_body(uid, changed.status), rt, view)
    assert gone.released and gone.error is None
    left = await conn.call("list", lambda c: ([d.UUIDString() for d in c.listAllDomains()],
                                              sorted(v.name() for v in c.storagePoolLookupByName("default").listAllVolumes())))
    assert uid not in left[0]
    assert left[1] == [ISO_VOLUME]  # the ISOImage's volume is not ours to delete


async def test_foreign_domain_with_the_same_name_is_reported_not_overwritten(setup) -> None:
    rt, conn, uri = setup
    foreign = await conn.call("foreign", lambda c: c.defineXML(
        "<domain type='test'><name>ns_inst</name><memory>65536</memory><os><type>hvm</type></os></domain>"
    ).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    view = ClusterView(hosts={"h": host_obj("h", uri)})
    # No disk to make first: define itself meets the name (libvirt refuses it); said the same way.
    out = await sync_vm(vm_body(str(uuid.uuid4()), disks=[]), rt, view)
    assert out.error is not None and "already exists" in out.error.message and "not managed" in out.error.message
    assert out.status["printableStatus"] == "Provisioning"
    assert await conn.call("foreign", lambda c: c.lookupByName("ns_inst").XMLDesc(
        libvirt.VIR_DOMAIN_XML_INACTIVE)) == foreign  # untouched


async def test_a_new_vm_is_defined_and_booted_in_one_call(setup) -> None:
    rt, conn, uri = setup
    from prometheus_client import REGISTRY

    def calls(op: str) -> float:
        return REGISTRY.get_sample_value("libvirt_operator_libvirt_calls_total",
                                         {"host": "h", "operation": op, "outcome": "ok"}) or 0.0

    before = {op: calls(op) for op in ("define_start", "define", "start")}
    view = ClusterView(hosts={"h": host_obj("h", uri)})
    uid = str(uuid.uuid4())
    out = await sync_vm(vm_body(uid, disks=[]), rt, view)
    assert out.error is None and out.status["printableStatus"] == "Running"
    assert [e[2] for e in out.events if e[1] == "Started"] == \
        ["placed on LibvirtHost h; domain ns_inst defined and started"]
    assert out.status["lastStartTime"] and out.status["firstBootTime"]
    assert {op: calls(op) - before[op] for op in before} == {"define_start": 1, "define": 0, "start": 0}
    assert await conn.call("active", lambda c: c.lookupByUUIDString(uid).isActive()) == 1

    # Halted: defined only, nothing booted.
    halted = str(uuid.uuid4())
    body = vm_body(halted, disks=[], runStrategy="Halted")
    body["metadata"]["name"] = "halted"
    out = await sync_vm(body, rt, view)
    assert out.error is None and out.status["printableStatus"] == "Stopped"
    assert await conn.call("active", lambda c: c.lookupByUUIDString(halted).isActive()) == 0
    assert calls("define") - before["define"] == 1


async def test_start_failure_backs_off(setup, monkeypatch) -> None:
    rt, conn, uri = setup
    from libvirt_operator.adapters.libvirt import domains

    # A mock: a QEMU that dies while starting cannot be made on the test driver (the real-libvirtd
    # suites kill QEMU for real). Refuses the boot of the define+start call and of a start alike.
    def broken_create(dom):
        raise libvirt.libvirtError("internal error: qemu unexpectedly closed the monitor")

    monkeypatch.setattr(domains, "_create", broken_create)
    view = ClusterView(hosts={"h": host_obj("h", uri)})
    uid = str(uuid.uuid4())
    out = await sync_vm(vm_body(uid, disks=[]), rt, view)
    assert out.status["printableStatus"] == "CrashLoopBackOff"
    assert out.status["startFailure"]["consecutiveFailCount"] == 1
    assert out.error is not None and out.requeue_after is not None and 5 < out.requeue_after <= 10
    assert "qemu unexpectedly closed the monitor" in out.error.message
    assert "FailedStart" in {e[1] for e in out.events}
    # the define of that call stands: the domain is there (shut off) for the next attempt, reported
    assert await conn.call("defined", lambda c: c.lookupByUUIDString(uid).isActive()) == 0
    assert out.status["domainUUID"] == uid


async def test_eject_after_first_boot_empties_cdroms_once_the_first_run_ends(setup) -> None:
    rt, conn, uri = setup
    uid = str(uuid.uuid4())

    def make_iso(c):
        c.storagePoolLookupByName("default").createXML(
            f"<volume><name>{ISO_VOLUME}</name><capacity unit='bytes'>1048576</capacity></volume>", 0)

    await conn.call("make-iso", make_iso)
    view = ClusterView(hosts={"h": host_obj("h", uri)}, iso=lambda ns, name: iso_obj("Ready"))
    out = await sync_vm(vm_body(uid, installMediaPolicy="EjectAfterFirstBoot"), rt, view)
    assert out.status["printableStatus"] == "Running" and not out.status.get("mediaEjected")

    def cdrom_source(c):
        root = ET.fromstring(c.lookupByUUIDString(uid).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        return root.find("devices/disk[@device='cdrom']/source")

    assert await conn.call("src", cdrom_source) is not None  # the installer keeps its media while it runs
    # The guest shuts down at the end of the install; the host resync observes it.
    from libvirt_operator.adapters.libvirt import domains
    await conn.call("shutdown", lambda c: c.lookupByUUIDString(uid).shutdown())
    observed = (await conn.call("list", domains.list_domains))[uid]
    out = await sync_vm(vm_body(uid, out.status, installMediaPolicy="EjectAfterFirstBoot"), rt, view,
                        observed=observed)
    assert out.error is None, out.error
    assert out.status["mediaEjected"] is True and out.status["printableStatus"] == "Running"
    assert {"MediaEjected", "Redefined", "Started"} <= {e[1] for e in out.events}
    assert await conn.call("src", cdrom_source) is None
    # ISOImage gone afterwards: no longer needed.
    gone_view = ClusterView(hosts={"h": host_obj("h", uri)})
    again = await sync_vm(vm_body(uid, out.status, installMediaPolicy="EjectAfterFirstBoot"), rt, gone_view)
    assert again.error is None and again.events == []


async def test_host_ref_placement_reads_no_reservations(setup) -> None:
    rt, conn, uri = setup

    def every_vm():
        raise AssertionError("a hostRef pin rebuilt the reservations from every VM")

    view = ClusterView(hosts={"h": host_obj("h", uri)}, vms=every_vm)
    out = await sync_vm(vm_body(str(uuid.uuid4()), disks=[]), rt, view)
    assert out.error is None and out.status["host"] == "h" and out.status["printableStatus"] == "Running"


async def test_concurrent_placements_see_each_other_before_any_status_lands(test_host_factory) -> None:
    """20 selector VMs reconciled at once over two hosts with room for exactly 10 each: every
    placement counts the ones decided before it, although no status has been written yet."""
    from collections import Counter

    from libvirt_operator.handlers.vm_state import VmState

    pool = HostPool()
    st = VmState()
    try:
        for name in ("a", "b"):
            uri = test_host_factory(f"burst-{name}", cpus=10, memory_mib=8192)
            await pool.ensure(name, ConnectOptions(uri=uri))
            obj = host_obj(name, uri)
            obj["metadata"]["labels"] = {"zone": "burst"}
            obj["status"]["capacity"] = {"cpus": 10, "memory": "8Gi"}
            st.hosts[name] = obj
        rt = Runtime(settings=Settings(knowledge_base_enabled=False), pool=pool, kube=None)  # type: ignore[arg-type]
        bodies = []
        for i in range(20):
            body = {"metadata": {"namespace": "ns", "name": f"burst{i}", "uid": str(uuid.uuid4()), "generation": 1},
                    "spec": {"cpu": 1, "memory": "128Mi", "hostSelector": {"matchLabels": {"zone": "burst"}}},
                    "status": {}}
            st.vms[body["metadata"]["uid"]] = body
            st.index(body["metadata"]["uid"])
            bodies.append(body)
        outcomes = await asyncio.gather(*(sync_vm(b, rt, st.view()) for b in bodies))
        assert [o.error for o in outcomes] == [None] * 20
        assert Counter(o.status["host"] for o in outcomes) == {"a": 10, "b": 10}
    finally:
        await pool.close_all()


@pytest.mark.parametrize("kind", ["running", "stopped", "transient"])
async def test_teardown_removes_the_domain_as_found_and_the_volume_its_disk_uses(test_host_factory, kind) -> None:
    """Teardown reads which files the domain uses from the domain itself (its running and its next
    boot's definition): a volume in a pool the caller did not name is found through the disk."""
    from libvirt_operator.adapters.libvirt import domains
    from libvirt_operator.adapters.libvirt.domain_xml import build_domain_xml
    from libvirt_operator.core.domain import DiskDefinition, DomainDefinition, Owner, volume_name

    uri = test_host_factory("teardown", pools=("default", "other"))
    pool = HostPool()
    conn = await pool.ensure("h", ConnectOptions(uri=uri))
    uid, bystander = str(uuid.uuid4()), str(uuid.uuid4())
    try:
        def make(c: Any) -> None:
            for owner in (uid, bystander):
                vol = c.storagePoolLookupByName("other").createXML(
                    f"<volume><name>{volume_name(owner, 'data')}</name><capacity unit='MiB'>1</capacity>"
                    "<target><format type='qcow2'/></target></volume>", 0)
                xml = build_domain_xml(DomainDefinition(
                    name=f"ns_{owner[:8]}", uuid=owner, vcpus=1, memory_bytes=64 << 20, type="test",
                    firmware="bios", owner=Owner("ns", owner[:8], owner),
                    disks=(DiskDefinition("data", "disk", vol.path()),)))
                if kind == "transient":
                    c.createXML(xml, 0)
                else:
                    dom = c.defineXML(xml)
                    if kind == "running":
                        dom.create()

        await conn.call("make", make)
        deleted = await conn.call("teardown", lambda c: domains.teardown(c, uid, ["default"], shared_pools=[]))
        assert deleted == [volume_name(uid, "data")]

        def left(c: Any) -> tuple[list[str], list[str]]:
            return (sorted(d.UUIDString() for d in c.listAllDomains()),
                    sorted(v.name() for v in c.storagePoolLookupByName("other").listAllVolumes()))
        assert await conn.call("left", left) == ([bystander], [volume_name(bystander, "data")])
        # Again: nothing left to do, nothing else touched.
        assert await conn.call("teardown", lambda c: domains.teardown(c, uid, ["default"], shared_pools=[])) == []
        assert await conn.call("left", left) == ([bystander], [volume_name(bystander, "data")])
    finally:
        await pool.close_all()

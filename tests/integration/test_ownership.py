"""Nothing is attached, adopted or destroyed that is not the VM's own (issues 9 and 15): volume names
carry the owner's uid, shortened domain names cannot be taken over, and ownership is decided on the
libvirt host, never from a status someone else may have written. Real apiserver, real operator,
libvirt test-driver hosts."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from libvirt_operator.adapters.libvirt.domain_xml import build_domain_xml
from libvirt_operator.adapters.libvirt.volumes import volume_name as iso_volume_name
from libvirt_operator.core.domain import DiskDefinition, DomainDefinition, Owner
from tests.harness.kube import GROUP, VERSION, Kube
from tests.harness.libvirt_module import libvirt
from tests.integration.test_vm_lifecycle import (
    HOST, RUNNING, VM, delete_and_wait, domains, make_host, make_vm, on_host, status, uniq, volumes, wait_printable,
)

SHA = "sha256:" + "7a" * 32


@pytest.fixture
def host(kube, operator, test_host_factory) -> str:
    name = uniq("own")
    yield make_host(kube, test_host_factory(name, cpus=8, memory_mib=8192), name)
    kube.delete(HOST, name)


def disk_file(operator: Any, host: str, uid: str, disk: str) -> str | None:
    def read(c: Any) -> str | None:
        import xml.etree.ElementTree as ET
        root = ET.fromstring(c.lookupByUUIDString(uid).XMLDesc(0))
        for el in root.iterfind("./devices/disk"):
            alias = el.find("alias")
            if alias is not None and alias.get("name") == f"ua-disk-{disk}":
                source = el.find("source")
                return source.get("file") if source is not None else None
        return None
    return on_host(operator, host, read)


def capacity(operator: Any, host: str, volume: str) -> int:
    return on_host(operator, host, lambda c: int(c.storagePoolLookupByName("default").storageVolLookupByName(volume)
                                                  .info()[1]))


def patch_status(kube: Kube, plural: str, namespace: str, name: str, status_patch: dict[str, Any]) -> None:
    """What anyone allowed to write the status subresource can do."""
    kube.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, plural, name,
                                                      {"status": status_patch})


def test_vm_a_disk_b_root_and_vm_a_b_disk_root_get_distinct_volumes(kube, operator, namespace, host) -> None:
    # Issue 9 defect 1: both were `<ns>_a-b-root`; the second VM adopted the first's disk.
    a = make_vm(kube, namespace, "a", hostRef=host, disks=[{"name": "b-root", "volume": {"size": "64Mi"}}])
    ab = make_vm(kube, namespace, "a-b", hostRef=host, disks=[{"name": "root", "volume": {"size": "128Mi"}}])
    a_uid, ab_uid = a["metadata"]["uid"], ab["metadata"]["uid"]
    wait_printable(kube, namespace, "a", "Running")
    wait_printable(kube, namespace, "a-b", "Running")
    a_vol, ab_vol = f"lvop-{a_uid}-b-root", f"lvop-{ab_uid}-root"
    assert volumes(operator, host) == sorted([a_vol, ab_vol])
    assert capacity(operator, host, a_vol) == 64 << 20 and capacity(operator, host, ab_vol) == 128 << 20
    assert disk_file(operator, host, a_uid, "b-root").endswith("/" + a_vol)
    assert disk_file(operator, host, ab_uid, "root").endswith("/" + ab_vol)
    assert [v["name"] for v in status(kube, namespace, "a")["volumes"]] == [a_vol]
    assert [v["name"] for v in status(kube, namespace, "a-b")["volumes"]] == [ab_vol]

    delete_and_wait(kube, namespace, "a")
    assert volumes(operator, host) == [ab_vol]  # the other VM's disk survives
    assert domains(operator, host)[f"{namespace}_a-b"] == (ab_uid, RUNNING)
    delete_and_wait(kube, namespace, "a-b")
    assert volumes(operator, host) == []


def _earlier_domain_name(namespace: str, name: str, uid: str) -> str:
    """How earlier releases shortened long names (a plain name could equal it)."""
    base = f"{namespace}_{name}"
    if len(base) <= 63:
        return base
    return f"{base[:54].rstrip('-._')}-{hashlib.sha256(uid.encode()).hexdigest()[:8]}"


def test_vm_named_like_a_shortened_domain_name_gets_an_error_not_that_domain(kube, operator, namespace,
                                                                             host) -> None:
    # Issue 15 defect 2. The first VM runs on a domain and volume an earlier release created (names of
    # the earlier scheme): it keeps them after the upgrade. A second VM named exactly like that
    # shortened domain name must not adopt, report or delete any of it.
    long_name = "first-" + "x" * 70
    first = make_vm(kube, namespace, long_name, hostRef=host,  # waits for media: nothing made yet
                    disks=[{"name": "root", "volume": {"size": "64Mi"}},
                           {"name": "cd", "cdrom": {"isoImageRef": {"name": "not-yet"}}}])
    uid1 = first["metadata"]["uid"]
    wait_printable(kube, namespace, long_name, "WaitingForMedia")
    legacy_dname = _earlier_domain_name(namespace, long_name, uid1)
    legacy_vol = f"{legacy_dname}-root"

    def earlier_release(c: Any) -> str:
        pool = c.storagePoolLookupByName("default")
        path = pool.createXML(f"<volume><name>{legacy_vol}</name><capacity unit='MiB'>64</capacity>"
                              "<target><format type='qcow2'/></target></volume>", 0).path()
        c.defineXML(build_domain_xml(DomainDefinition(
            name=legacy_dname, uuid=uid1, vcpus=1, memory_bytes=128 << 20, type="qemu", firmware="bios",
            owner=Owner(namespace, long_name, uid1), disks=(DiskDefinition("root", "disk", path),))))
        return path

    legacy_path = on_host(operator, host, earlier_release)
    kube.patch(VM, long_name, {"spec": {"disks": [{"name": "root", "volume": {"size": "64Mi"}}]}}, namespace)
    obj = kube.wait_for(lambda: (o := kube.get(VM, long_name, namespace)) and
                        o["status"].get("observedGeneration") == o["metadata"]["generation"] and
                        o["status"].get("printableStatus") == "Running" and o, timeout=30, what="spec applied")
    st = obj["status"]
    assert st["domainName"] == legacy_dname and [v["name"] for v in st["volumes"]] == [legacy_vol]
    assert domains(operator, host) == {legacy_dname: (uid1, RUNNING)}
    assert disk_file(operator, host, uid1, "root") == legacy_path
    assert volumes(operator, host) == [legacy_vol]  # the data disk was kept, no empty one made

    thief_name = legacy_dname.split("_", 1)[1]
    thief = make_vm(kube, namespace, thief_name, hostRef=host, disks=[{"name": "root", "volume": {"size": "64Mi"}}])
    obj = kube.wait_for(lambda: (o := kube.get(VM, thief_name, namespace)) and
                        (o.get("status") or {}).get("error") and o, timeout=30, what="the conflict reported")
    err = obj["status"]["error"]
    assert "already exists" in err["message"] and uid1 in err["message"]
    assert f"belongs to VirtualMachine {namespace}/{long_name}" in err["message"]
    assert "does not see" not in err["message"] and "deleted" not in err["message"]
    assert obj["status"]["printableStatus"] == "Provisioning"
    assert not obj["status"].get("volumes")  # never the first VM's volume
    assert volumes(operator, host) == [legacy_vol]  # and nothing created before the conflict was seen

    delete_and_wait(kube, namespace, thief_name)
    assert domains(operator, host) == {legacy_dname: (uid1, RUNNING)}
    assert volumes(operator, host) == [legacy_vol]
    assert status(kube, namespace, long_name)["printableStatus"] == "Running"
    assert thief["metadata"]["uid"] not in {u for u, _ in domains(operator, host).values()}

    # The first VM's own teardown still removes what its domain used under the earlier names.
    delete_and_wait(kube, namespace, long_name)
    assert domains(operator, host) == {} and volumes(operator, host) == []


def test_a_new_long_name_never_equals_a_plain_one(kube, operator, namespace, host) -> None:
    long_name = "second-" + "y" * 70
    uid = make_vm(kube, namespace, long_name, hostRef=host)["metadata"]["uid"]
    st = wait_printable(kube, namespace, long_name, "Running")["status"]
    assert "__" in st["domainName"] and len(st["domainName"]) <= 63  # no Kubernetes name yields `__`
    assert domains(operator, host)[st["domainName"]] == (uid, RUNNING)
    delete_and_wait(kube, namespace, long_name)


def test_status_written_by_someone_else_never_chooses_what_is_attached_or_deleted(kube, operator, host) -> None:
    # Issue 9 defect 3: whoever can patch status pointed status.volumes and an ISOImage's
    # status.hosts at another tenant's volumes, which were then attached and deleted.
    victim_ns, evil_ns = kube.new_namespace("victim"), kube.new_namespace("evil")
    victim_uid = make_vm(kube, victim_ns, "db", hostRef=host,
                         disks=[{"name": "root", "volume": {"size": "64Mi"}}])["metadata"]["uid"]
    wait_printable(kube, victim_ns, "db", "Running")
    [victim_disk] = volumes(operator, host)  # as the host names it
    victim_iso = iso_volume_name(victim_ns, "installer", SHA)  # another tenant's imported image
    on_host(operator, host, lambda c: c.storagePoolLookupByName("default").createXML(
        f"<volume><name>{victim_iso}</name><capacity unit='MiB'>1</capacity></volume>", 0).name())
    victim_dname = status(kube, victim_ns, "db")["domainName"]

    # The attacker's ISOImage never imports (a refused destination); its status is then rewritten to
    # name the victim's disk as its volume on the host.
    kube.create("isoimages", {"metadata": {"name": "evil"}, "spec": {
        "source": {"url": "http://169.254.169.254/evil.iso"}, "checksum": SHA,
        "targets": {"hostNames": [host]}}}, evil_ns)
    kube.wait_for(lambda: ((kube.get("isoimages", "evil", evil_ns) or {}).get("status") or {}).get("error"),
                  timeout=30, what="the import failed")
    patch_status(kube, "isoimages", evil_ns, "evil",
                 {"hosts": [{"host": host, "phase": "Ready", "pool": "default", "volume": victim_disk}]})

    # A VM using that ISOImage waits for its media: the cdrom is never the victim's disk.
    thief_uid = make_vm(kube, evil_ns, "thief", hostRef=host,
                        disks=[{"name": "cd", "bootOrder": 1, "cdrom": {"isoImageRef": {"name": "evil"}}}]
                        )["metadata"]["uid"]
    obj = kube.wait_for(lambda: (o := kube.get(VM, "thief", evil_ns)) and
                        "missing from pool" in ((o.get("status") or {}).get("error") or {}).get("message", "")
                        and o, timeout=30, what="thief waits for its own media")
    assert obj["status"]["printableStatus"] == "WaitingForMedia"
    assert iso_volume_name(evil_ns, "evil", SHA) in obj["status"]["error"]["message"]
    assert thief_uid not in {u for u, _ in domains(operator, host).values()}

    # A VM of the attacker's whose status lists the victim's volumes (and domain name) is deleted.
    wiper_uid = make_vm(kube, evil_ns, "wiper", hostRef=host,
                        disks=[{"name": "root", "volume": {"size": "64Mi"}}])["metadata"]["uid"]
    wait_printable(kube, evil_ns, "wiper", "Running")
    forged = [{"disk": "root", "pool": "default", "name": victim_disk},
              {"disk": "cd", "pool": "default", "name": victim_iso}]
    patch_status(kube, VM, evil_ns, "wiper", {"volumes": forged, "domainName": victim_dname})
    from libvirt_operator.handlers.vm_state import state_of
    vm_state = state_of(operator.runtime)
    kube.wait_for(lambda: (vm_state.vms.get(wiper_uid) or {}).get("status", {}).get("volumes") == forged,
                  timeout=10, what="the operator sees the forged status")
    assert f"lvop-{wiper_uid}-root" in volumes(operator, host)
    delete_and_wait(kube, evil_ns, "wiper")
    assert volumes(operator, host) == sorted([victim_disk, victim_iso])  # only the wiper's own volume went

    delete_and_wait(kube, evil_ns, "thief")
    kube.delete("isoimages", "evil", evil_ns)
    kube.wait_for(lambda: kube.get("isoimages", "evil", evil_ns) is None, timeout=30, what="ISOImage gone")
    assert volumes(operator, host) == sorted([victim_disk, victim_iso])

    assert domains(operator, host) == {victim_dname: (victim_uid, RUNNING)}
    assert disk_file(operator, host, victim_uid, "root").endswith("/" + victim_disk)
    assert status(kube, victim_ns, "db")["printableStatus"] == "Running"
    assert victim_disk == f"lvop-{victim_uid}-root"
    delete_and_wait(kube, victim_ns, "db")
    assert volumes(operator, host) == [victim_iso]  # the victim's own teardown leaves the image alone


# --- the host decides: reconcile.vm against a test-driver host, without Kubernetes ---------------

@pytest.fixture
async def direct(test_host_factory):
    from libvirt_operator.adapters.libvirt import ConnectOptions, HostPool
    from libvirt_operator.core.settings import Settings
    from libvirt_operator.reconcile.runtime import Runtime
    from libvirt_operator.reconcile.vm_types import ClusterView

    uri = test_host_factory("direct", cpus=8, memory_mib=8192)
    pool = HostPool()
    conn = await pool.ensure("h", ConnectOptions(uri=uri))
    rt = Runtime(settings=Settings(knowledge_base_enabled=False), pool=pool, kube=None)  # type: ignore[arg-type]
    view = ClusterView(hosts={"h": {"metadata": {"name": "h"}, "spec": {"uri": uri}, "status": {
        "conditions": [{"type": "Ready", "status": "True"}], "capacity": {"cpus": 8, "memory": "8Gi"},
        "allocated": {"cpus": 0, "memory": "0"}, "domainTypes": ["test"]}}})
    yield rt, conn, view
    await pool.close_all()


def _vm(uid: str, name: str, disk: str, forged: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name, "uid": uid, "generation": 1},
            "spec": {"hostRef": "h", "memory": "128Mi", "disks": [{"name": disk, "volume": {"size": "64Mi"}}]},
            "status": {"host": "h", "volumes": forged or []}}


async def test_an_earlier_scheme_volume_two_domains_share_is_kept_until_the_last_one_goes(direct) -> None:
    # Before the fix VM `a` (disk b-root) and VM `a-b` (disk root) both used `ns_a-b-root`. After the
    # upgrade each VM keeps using what its own domain uses; deleting one must not take the other's disk.
    import uuid as uuidlib

    from libvirt_operator.reconcile.vm import sync_vm
    from libvirt_operator.reconcile.vm_delete import delete_vm

    rt, conn, view = direct
    a_uid, ab_uid = str(uuidlib.uuid4()), str(uuidlib.uuid4())

    def earlier_release(c: Any) -> str:
        path = c.storagePoolLookupByName("default").createXML(
            "<volume><name>ns_a-b-root</name><capacity unit='MiB'>64</capacity>"
            "<target><format type='qcow2'/></target></volume>", 0).path()
        for uid, name, disk in ((a_uid, "a", "b-root"), (ab_uid, "a-b", "root")):
            c.defineXML(build_domain_xml(DomainDefinition(
                name=f"ns_{name}", uuid=uid, vcpus=1, memory_bytes=128 << 20, type="test", firmware="bios",
                owner=Owner("ns", name, uid), disks=(DiskDefinition(disk, "disk", path),))))
        return path

    shared = await conn.call("earlier", earlier_release)

    def pool_volumes(c: Any) -> list[str]:
        return sorted(v.name() for v in c.storagePoolLookupByName("default").listAllVolumes())

    for uid, name, disk in ((a_uid, "a", "b-root"), (ab_uid, "a-b", "root")):
        out = await sync_vm(_vm(uid, name, disk), rt, view)
        assert out.error is None, out.error
        assert out.status["volumes"] == [{"disk": disk, "pool": "default", "name": "ns_a-b-root"}]
    assert await conn.call("vols", pool_volumes) == ["ns_a-b-root"]  # adopted by each own domain, no new disks

    gone = await delete_vm(_vm(a_uid, "a", "b-root"), rt, view)
    assert gone.released and gone.error is None
    assert await conn.call("vols", pool_volumes) == ["ns_a-b-root"]  # the other domain still uses it
    gone = await delete_vm(_vm(ab_uid, "a-b", "root"), rt, view)
    assert gone.released
    assert await conn.call("vols", pool_volumes) == []
    assert shared.endswith("/ns_a-b-root")


async def test_teardown_deletes_only_volumes_named_with_the_vm_uid(direct) -> None:
    import uuid as uuidlib

    from libvirt_operator.reconcile.vm import sync_vm
    from libvirt_operator.reconcile.vm_delete import delete_vm

    rt, conn, view = direct
    uid, other = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    out = await sync_vm(_vm(uid, "mine", "root"), rt, view)
    assert out.error is None, out.error

    def add(c: Any) -> None:
        pool = c.storagePoolLookupByName("default")
        for name in (f"lvop-{uid}-scratch", f"lvop-{other}-root", "ns_mine-root", "precious"):
            pool.createXML(f"<volume><name>{name}</name><capacity unit='MiB'>1</capacity></volume>", 0)

    await conn.call("add", add)
    forged = [{"disk": "root", "pool": "default", "name": n} for n in (f"lvop-{other}-root", "ns_mine-root", "precious")]
    gone = await delete_vm(_vm(uid, "mine", "root", forged), rt, view)
    assert gone.released and gone.error is None
    left = await conn.call("vols", lambda c: sorted(v.name() for v in c.storagePoolLookupByName("default")
                                                    .listAllVolumes()))
    # Its own disk and a left-over volume named with its uid went; nothing status named.
    assert left == sorted([f"lvop-{other}-root", "ns_mine-root", "precious"])

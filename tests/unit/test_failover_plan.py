"""Pure host-failure planning: when a VM leaves an out-of-service host, what keeps it there, and where it
may go (cordoned and fenced hosts take nothing new; the new host must share the VM's disk pools)."""

from __future__ import annotations

from libvirt_operator.core.api.vm import VirtualMachineSpec
from libvirt_operator.core.errors import ErrorCode
from libvirt_operator.reconcile import plan
from libvirt_operator.reconcile.plan import HostView

GiB = 2**30


def spec(**kw) -> VirtualMachineSpec:
    return VirtualMachineSpec.model_validate(kw)


def host(name: str, **kw) -> HostView:
    kw.setdefault("ready", True)
    return HostView(name=name, cpus=8, memory_bytes=16 * GiB, **kw)


SHARED_DISK = {"name": "data", "volume": {"size": "1Gi", "pool": "nfs"}}
LOCAL_DISK = {"name": "root", "volume": {"size": "1Gi"}}          # the host's default pool
CDROM = {"name": "cd", "cdrom": {"isoImageRef": {"name": "boot"}}}


def test_a_host_in_service_needs_no_decision() -> None:
    assert plan.plan_failover(spec(hostFailurePolicy="Recreate"), host("a", shared_pools=frozenset({"nfs"}))) is None


def test_wait_is_the_default_and_keeps_the_vm_on_the_fenced_host() -> None:
    decision = plan.plan_failover(spec(disks=[SHARED_DISK]), host("a", out_of_service=True))
    assert decision is not None and not decision.move
    assert "hostFailurePolicy Wait" in decision.message


def test_recreate_moves_a_vm_whose_disks_all_live_in_shared_pools() -> None:
    decision = plan.plan_failover(spec(hostFailurePolicy="Recreate", disks=[CDROM, SHARED_DISK]),
                                  host("a", out_of_service=True, shared_pools=frozenset({"nfs"})))
    assert decision is not None and decision.move
    assert decision.shared_pools == {"nfs"}  # cdroms are not volumes: the ISOImage decides where they exist


def test_a_disk_in_a_host_local_pool_keeps_the_vm_and_is_named() -> None:
    decision = plan.plan_failover(spec(hostFailurePolicy="Recreate", disks=[SHARED_DISK, LOCAL_DISK]),
                                  host("a", out_of_service=True, shared_pools=frozenset({"nfs"}),
                                       default_pool="local-ssd"))
    assert decision is not None and not decision.move
    assert "disk root (pool local-ssd) cannot follow it" in decision.message
    assert "data" not in decision.message.split("cannot follow")[0].replace("LibvirtHost a", "")


def test_the_new_host_must_share_every_disk_pool_and_never_be_the_old_one() -> None:
    vm = spec(hostFailurePolicy="Recreate", disks=[SHARED_DISK])
    hosts = [host("a", out_of_service=True, shared_pools=frozenset({"nfs"})),
             host("b"),                                           # no shared pool: the disk would be missing
             host("c", shared_pools=frozenset({"nfs", "other"}))]
    placed = plan.choose_host(vm, hosts, avoid={"a"}, shared_pools={"nfs"})
    assert placed.host == "c"
    none = plan.choose_host(vm, hosts[:2], avoid={"a"}, shared_pools={"nfs"})
    assert none.host is None and none.error is not None and none.error.code is ErrorCode.NO_SCHEDULABLE_HOST
    assert "spec.sharedPools (nfs)" in none.error.message


def test_cordoned_and_fenced_hosts_take_no_new_vm() -> None:
    hosts = [host("a", unschedulable=True), host("b", out_of_service=True)]
    placed = plan.choose_host(spec(), hosts)
    assert placed.host is None and placed.error is not None
    assert "cordoned or out of service: a, b" in placed.error.message
    pinned = plan.choose_host(spec(hostRef="a"), hosts)
    assert pinned.host is None and "is cordoned" in pinned.error.message
    assert plan.choose_host(spec(), [*hosts, host("c")]).host == "c"


def test_host_view_reads_the_day_two_fields() -> None:
    hv = HostView.from_object({"metadata": {"name": "a"}, "spec": {
        "unschedulable": True, "outOfService": True, "sharedPools": ["nfs", "rbd"]}})
    assert hv.unschedulable and hv.out_of_service and hv.shared_pools == {"nfs", "rbd"}
    assert not hv.schedulable

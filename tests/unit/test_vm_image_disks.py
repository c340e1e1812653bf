"""Disks from images, planned without a host: the base's pool is subject to the host's allowedPools
(a tenant must not clone a volume out of a pool the host does not expose), and the clone requests
name the VM's own volume, never the base."""

from __future__ import annotations

from libvirt_operator.core.api.vm import VirtualMachineSpec
from libvirt_operator.core.errors import ErrorCode
from libvirt_operator.reconcile import plan
from libvirt_operator.reconcile.vm_images import clone_requests

UID = "0b7e4c2a-55f1-4d7e-9a0c-3f2b1e6d8c90"


def _spec(**volume) -> VirtualMachineSpec:
    return VirtualMachineSpec.model_validate({"disks": [
        {"name": "root", "volume": {"source": {"volume": {"pool": "golden", "name": "base.qcow2"}}, **volume}},
        {"name": "data", "volume": {"size": "1Gi"}}]})


def test_the_base_pool_must_be_exposed_by_the_host() -> None:
    host = plan.HostView(name="kvm-1", ready=True, allowed_pools=frozenset({"images"}))
    assert plan.pools_of(_spec(), host) == ["default", "golden"]
    denial = plan.host_denial(_spec(), host, "team-a", None)
    assert denial is not None and denial.code is ErrorCode.POOL_NOT_ALLOWED and "storage pool golden" in denial.message
    allowed = plan.HostView(name="kvm-1", ready=True, allowed_pools=frozenset({"golden"}))
    assert plan.host_denial(_spec(), allowed, "team-a", None) is None


def test_clone_requests() -> None:
    host = plan.HostView(name="kvm-1", default_pool="default")
    (req,) = clone_requests(_spec(), UID, host)  # the blank data disk is not a clone
    assert (req.pool, req.name, req.disk, req.source_pool, req.source_name, req.mode, req.size_bytes) == \
        ("default", f"lvop-{UID}-root", "root", "golden", "base.qcow2", "backing", None)
    (full,) = clone_requests(_spec(clone="full", size="2Gi", pool="fast"), UID, host)
    assert (full.pool, full.mode, full.size_bytes) == ("fast", "full", 2 * 2**30)

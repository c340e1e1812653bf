"""handlers.vm.needs_reconcile: which VM watch events queue a reconcile. Our own status writes must
not (every status write would re-run the VM); a spec change, a deletion, an action request must."""

from __future__ import annotations

from typing import Any

from libvirt_operator.handlers.vm import needs_reconcile


def vm(generation: int = 1, **meta: Any) -> dict[str, Any]:
    return {"metadata": {"uid": "u", "generation": generation, "resourceVersion": "1", **meta},
            "spec": {"memory": "64Mi"}, "status": {}}


def test_first_sight_spec_deletion_and_annotations_queue_the_vm() -> None:
    assert needs_reconcile(None, vm()) == "new"  # created, or first seen after a restart
    assert needs_reconcile(vm(1), vm(2)) == "spec"
    assert needs_reconcile(vm(), vm(deletionTimestamp="2026-12-03T00:00:00Z")) == "deletion"
    request = {"virt.libvirt-operator.io/action-request": '{"action": "stop", "id": "1"}'}
    assert needs_reconcile(vm(), vm(annotations=request)) == "annotations"
    deleting = {"deletionTimestamp": "2026-12-03T00:00:00Z"}
    assert needs_reconcile(vm(**deleting, finalizers=["a", "b"]), vm(**deleting, finalizers=["b"])) == "finalizers"


def test_a_status_write_or_a_resync_queues_nothing() -> None:
    before, after = vm(), vm(resourceVersion="2")
    after["status"] = {"printableStatus": "Running"}
    assert needs_reconcile(before, after) is None
    assert needs_reconcile(vm(finalizers=["x"]), vm(finalizers=["x", "y"])) is None

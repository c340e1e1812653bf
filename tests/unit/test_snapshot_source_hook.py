"""A deleted VM fails its snapshots; a namespace without live snapshots is not listed for it."""

from __future__ import annotations

from typing import Any

from libvirt_operator.handlers.snapshot import fail_snapshots_of_deleted_vm


class ListingKube:
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items, self.lists = items, []

    async def list_objects(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        self.lists.append((plural, namespace))
        return self.items


def vm(namespace: str) -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": "db", "uid": "u-1"}}


async def test_a_namespace_without_live_snapshots_is_not_listed() -> None:
    kube = ListingKube([])
    rt = type("Rt", (), {"kube": kube})()
    await fail_snapshots_of_deleted_vm(rt, vm("quiet"), {"live_snapshot_namespaces": {"busy": ["snap"]}})
    assert kube.lists == []
    await fail_snapshots_of_deleted_vm(rt, vm("busy"), {"live_snapshot_namespaces": {"busy": ["snap"]}})
    assert kube.lists == [("virtualmachinesnapshots", "busy")]
    await fail_snapshots_of_deleted_vm(rt, vm("quiet"), {})  # no index (not run by kopf): listed
    assert kube.lists[-1] == ("virtualmachinesnapshots", "quiet")

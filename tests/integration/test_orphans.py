"""Domains the operator created whose VirtualMachine is gone are reported on the host, never deleted;
foreign domains are left alone and not reported."""

from __future__ import annotations

import uuid

from libvirt_operator.core.domain import METADATA_NS


def _owned_metadata(namespace: str, name: str, uid: str) -> str:
    return (f"<lvop:vm xmlns:lvop='{METADATA_NS}'><lvop:namespace>{namespace}</lvop:namespace>"
            f"<lvop:name>{name}</lvop:name><lvop:uid>{uid}</lvop:uid></lvop:vm>")


def test_orphaned_domains_are_reported_not_deleted(kube, operator, test_host_factory) -> None:
    host = f"orphans-{uuid.uuid4().hex[:6]}"
    orphan_uid = str(uuid.uuid4())
    uri = test_host_factory(host, domains=[
        {"name": "prod_db", "uuid": orphan_uid, "metadata_xml": _owned_metadata("prod", "db", orphan_uid)},
        {"name": "hand-made", "uuid": str(uuid.uuid4())},  # not ours: never reported
    ])
    kube.create("libvirthosts", {"metadata": {"name": host}, "spec": {"uri": uri}})
    reported = kube.wait_for(
        lambda: ((kube.get("libvirthosts", host) or {}).get("status") or {}).get("orphanedDomains"),
        timeout=60, what="orphanedDomains on the host")
    assert reported == [{"uuid": orphan_uid, "namespace": "prod", "name": "db"}]

    def still_defined(c):
        return sorted(d.name() for d in c.listAllDomains())
    names = operator.call(lambda: operator.runtime.pool.get(host).call("list", still_defined))
    assert names == ["hand-made", "prod_db"]
    kube.delete("libvirthosts", host)

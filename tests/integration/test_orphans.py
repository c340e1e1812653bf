"""Domains the operator created whose VirtualMachine is gone are reported on the host, never deleted;
foreign domains are left alone and not reported."""

from __future__ import annotations

import time
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


def test_sharded_instances_report_only_their_namespaces_and_keep_each_others_entries(
        kube, kubeconfig, test_host_factory) -> None:
    """Two operators with disjoint --namespace sets on one host: each reports only orphans of its own
    namespaces (a domain whose VM lives in the other instance's namespace is not an orphan), and
    neither erases the other's entries of status.orphanedDomains."""
    from libvirt_operator.handlers import startup
    from tests.harness.operator import InProcessOperator

    ns_a, ns_b = kube.new_namespace("shard-a"), kube.new_namespace("shard-b")
    # A live VM of namespace b whose domain is on the host (it is pinned elsewhere and Halted, so no
    # operator acts on the host for it): instance a cannot see it and must not call its domain an orphan.
    live = kube.create("virtualmachines", {"metadata": {"name": "live"}, "spec": {
        "hostRef": f"absent-{uuid.uuid4().hex[:6]}", "runStrategy": "Halted", "memory": "128Mi"}}, ns_b)
    live_uid = live["metadata"]["uid"]
    orphan_a, orphan_b = str(uuid.uuid4()), str(uuid.uuid4())
    host = f"shards-{uuid.uuid4().hex[:6]}"
    uri = test_host_factory(host, domains=[
        {"name": "a_gone", "uuid": orphan_a, "metadata_xml": _owned_metadata(ns_a, "gone", orphan_a)},
        {"name": "b_gone", "uuid": orphan_b, "metadata_xml": _owned_metadata(ns_b, "gone", orphan_b)},
        {"name": "b_live", "uuid": live_uid, "metadata_xml": _owned_metadata(ns_b, "live", live_uid)},
    ])
    expected = [{"uuid": orphan_a, "namespace": ns_a, "name": "gone"},
                {"uuid": orphan_b, "namespace": ns_b, "name": "gone"}]
    session_memo = startup._current_memo  # the session operator's (if running); restored below
    op_a, op_b = InProcessOperator(kubeconfig, namespaces=(ns_a,)), InProcessOperator(kubeconfig, namespaces=(ns_b,))
    try:
        op_a.start()
        op_b.start()
        kube.create("libvirthosts", {"metadata": {"name": host}, "spec": {"uri": uri}})

        def orphaned() -> list[dict[str, str]]:
            return ((kube.get("libvirthosts", host) or {}).get("status") or {}).get("orphanedDomains") or []

        kube.wait_for(lambda: orphaned() == expected, timeout=60, what="both shards' orphans on the host")
        # Several sweeps of both instances (every 10 s each): the list never loses an entry and never
        # gains the live VM's domain.
        seen = []
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            seen.append(orphaned())
            time.sleep(0.25)
        assert all(s == expected for s in seen), [s for s in seen if s != expected][:3]
        op_a.check()
        op_b.check()
    finally:
        kube.delete("libvirthosts", host)
        kube.delete("virtualmachines", "live", ns_b)  # released by instance b (never placed)
        kube.wait_for(lambda: kube.get("virtualmachines", "live", ns_b) is None, timeout=30, what="VM deleted")
        op_a.stop()
        op_b.stop()
        startup._current_memo = session_memo


def test_orphan_write_is_a_read_merge_write_that_retries_on_a_real_conflict(kube, kubeconfig) -> None:
    """The resourceVersion precondition holds on the status subresource (409 on a stale write), and
    the writer re-reads and merges: a concurrent write by another instance between its read and its
    write is kept. The concurrent write is real (another client patches the apiserver)."""
    import asyncio

    from libvirt_operator.adapters.kube import ConflictError, KubeClient
    from libvirt_operator.handlers.vm_orphans import _write_orphans
    from libvirt_operator.handlers.vm_state import VmState
    from libvirt_operator.reconcile.tenancy import watched

    host = f"rmw-{uuid.uuid4().hex[:6]}"
    kube.create("libvirthosts", {"metadata": {"name": host}, "spec": {"uri": "test:///default"}})
    theirs = {"uuid": str(uuid.uuid4()), "namespace": "shard-y", "name": "old"}
    mine = {"uuid": str(uuid.uuid4()), "namespace": "shard-x", "name": "gone"}

    class RacingKube(KubeClient):
        """Lets another instance write right after each of the first reads."""
        races = 1

        async def get_object(self, plural, name, namespace=None):
            obj = await super().get_object(plural, name, namespace)
            if self.races:
                self.races -= 1
                kube.custom.patch_cluster_custom_object_status(
                    "virt.libvirt-operator.io", "v1alpha1", "libvirthosts", host,
                    {"status": {"orphanedDomains": [theirs]}})
            return obj

    async def scenario() -> None:
        client = await KubeClient.create(str(kubeconfig))
        racing = RacingKube(client.api)
        try:
            stale = await client.get_object("libvirthosts", host)
            await client.patch_status("libvirthosts", None, host, {"domains": 0})  # any write moves it on
            try:
                await client.patch_status("libvirthosts", None, host, {"orphanedDomains": [mine]},
                                          resource_version=stale["metadata"]["resourceVersion"])
            except ConflictError:
                pass
            else:
                raise AssertionError("a write with a stale resourceVersion was accepted")

            rt = type("Rt", (), {"kube": racing})()
            await _write_orphans(rt, VmState(), host, [mine], watched(("shard-x",)))  # type: ignore[arg-type]
        finally:
            await client.close()

    try:
        asyncio.run(scenario())
        assert kube.get("libvirthosts", host)["status"]["orphanedDomains"] == [mine, theirs]
    finally:
        kube.delete("libvirthosts", host)

"""LibvirtHost tenancy on the real apiserver with libvirt test-driver hosts and the real operator:
allowedNamespaces / namespaceSelector decide which namespaces may use a host, allowedPools which
storage pools it exposes; refusals are visible in status and Events, and nothing is created."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from tests.harness.kube import Kube, condition
from tests.harness.libvirt_module import libvirt

VM, HOST, ISO = "virtualmachines", "libvirthosts", "isoimages"
RUNNING, SHUTOFF = 1, 5


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def make_host(kube: Kube, uri: str, name: str, labels: dict[str, str] | None = None, **spec: Any) -> str:
    kube.create(HOST, {"metadata": {"name": name, "labels": labels or {}}, "spec": {"uri": uri, **spec}})
    kube.wait_condition(HOST, name, "Ready", "True", timeout=30)
    return name


def make_vm(kube: Kube, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("memory", "128Mi")
    return kube.create(VM, {"metadata": {"name": name}, "spec": spec}, namespace)


def domains(operator: Any, host: str) -> dict[str, tuple[str, int]]:
    """The domains on the operator's own connection (test:///file hosts are per connection)."""
    return operator.call(lambda: operator.runtime.pool.get(host).call(
        "test-inspect", lambda c: {d.name(): (d.UUIDString(), d.state()[0]) for d in c.listAllDomains()}))


def volumes(operator: Any, host: str, pool: str) -> list[str]:
    return operator.call(lambda: operator.runtime.pool.get(host).call(
        "test-inspect", lambda c: sorted(v.name() for v in c.storagePoolLookupByName(pool).listAllVolumes())))


def wait_reason(kube: Kube, namespace: str, name: str, ctype: str, reason: str, timeout: float = 30) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = kube.get(VM, name, namespace)
        cond = condition(obj or {}, ctype)
        return obj if cond and cond["reason"] == reason else None
    return kube.wait_for(check, timeout=timeout, what=f"{namespace}/{name} {ctype} reason {reason}")


def event_reasons(kube: Kube, namespace: str, name: str) -> list[str]:
    return [e.reason for e in kube.events_for(namespace, name)]


def label_namespace(kube: Kube, namespace: str, labels: dict[str, str | None]) -> None:
    kube.core.patch_namespace(namespace, {"metadata": {"labels": labels}})


def test_host_ref_to_a_host_that_does_not_admit_the_namespace_is_not_scheduled(
        kube, operator, namespace, test_host_factory) -> None:
    host = uniq("closed")
    make_host(kube, test_host_factory(host), host, allowedNamespaces=["someone-else"])
    make_vm(kube, namespace, "web", hostRef=host, disks=[{"name": "root", "volume": {"size": "1Gi"}}])

    obj = wait_reason(kube, namespace, "web", "Scheduled", "NamespaceNotAllowed")
    scheduled = condition(obj, "Scheduled")
    assert scheduled["status"] == "False"
    assert f"LibvirtHost {host} does not admit namespace {namespace}" in scheduled["message"]
    assert "allowedNamespaces: someone-else" in scheduled["message"]
    st = obj["status"]
    assert st["printableStatus"] == "ErrorUnschedulable" and "host" not in st
    assert st["error"]["code"] == "NAMESPACE_NOT_ALLOWED"
    assert st["error"]["context"] == {"host": host, "namespace": namespace}
    assert condition(obj, "Ready")["reason"] == "NamespaceNotAllowed"
    assert condition(obj, "Stalled")["status"] == "True"  # waits for a change, not for time
    kube.wait_for(lambda: "NamespaceNotAllowed" in event_reasons(kube, namespace, "web"),
                  what="a NamespaceNotAllowed Event")
    assert domains(operator, host) == {} and volumes(operator, host, "default") == []

    # The administrator admits the namespace: the VM is placed at once (host changes wake it).
    kube.patch(HOST, host, {"spec": {"allowedNamespaces": ["someone-else", namespace]}})
    obj = kube.wait_condition(VM, "web", "Ready", "True", namespace=namespace, timeout=30)
    assert obj["status"]["host"] == host and condition(obj, "Scheduled")["status"] == "True"
    assert "error" not in obj["status"]
    assert [state for _uuid, state in domains(operator, host).values()] == [RUNNING]


def test_namespace_selector_admits_namespaces_by_label(kube, operator, namespace, test_host_factory) -> None:
    tenant = uniq("tenant")
    host = uniq("sel")
    make_host(kube, test_host_factory(host), host,
              namespaceSelector={"matchExpressions": [{"key": "tenant", "operator": "In", "values": [tenant]}]})

    make_vm(kube, namespace, "app", hostRef=host)
    obj = wait_reason(kube, namespace, "app", "Scheduled", "NamespaceNotAllowed")
    assert "namespaceSelector does not match" in condition(obj, "Scheduled")["message"]
    assert domains(operator, host) == {}

    # Labelling the namespace admits it: the namespace watch wakes the waiting VM.
    started = time.monotonic()
    label_namespace(kube, namespace, {"tenant": tenant})
    obj = kube.wait_condition(VM, "app", "Ready", "True", namespace=namespace, timeout=30)
    assert obj["status"]["host"] == host
    assert time.monotonic() - started < 15  # well before the 15 s periodic recheck of parked VMs


def test_host_selector_skips_hosts_that_do_not_admit_the_namespace(
        kube, operator, namespace, test_host_factory) -> None:
    zone = uniq("zone")
    big, small = uniq("big"), uniq("small")
    # The big host would win on free memory; it does not admit the namespace.
    make_host(kube, test_host_factory(big, memory_mib=65536), big, labels={"zone": zone},
              allowedNamespaces=["someone-else"])
    make_host(kube, test_host_factory(small, memory_mib=4096), small, labels={"zone": zone})

    make_vm(kube, namespace, "a", hostSelector={"matchLabels": {"zone": zone}})
    obj = kube.wait_condition(VM, "a", "Ready", "True", namespace=namespace, timeout=30)
    assert obj["status"]["host"] == small
    assert domains(operator, big) == {}

    # With only refusing hosts matching, the VM is unschedulable with the tenancy reason.
    other_zone = uniq("zone")
    kube.patch(HOST, big, {"metadata": {"labels": {"zone": other_zone}}})
    make_vm(kube, namespace, "b", hostSelector={"matchLabels": {"zone": other_zone}})
    obj = wait_reason(kube, namespace, "b", "Scheduled", "NamespaceNotAllowed")
    message = condition(obj, "Scheduled")["message"]
    assert f"matching hostSelector zone={other_zone} admits this VM ({big})" in message
    assert domains(operator, big) == {}


def test_pool_not_exposed_by_the_host_is_refused_and_nothing_is_created(
        kube, operator, namespace, test_host_factory) -> None:
    host = uniq("pools")
    make_host(kube, test_host_factory(host, pools=("default", "fast")), host, allowedPools=[])

    make_vm(kube, namespace, "db", hostRef=host, disks=[{"name": "root", "volume": {"size": "1Gi"}},
                                                        {"name": "data", "volume": {"size": "1Gi", "pool": "fast"}}])
    obj = wait_reason(kube, namespace, "db", "Scheduled", "PoolNotAllowed")
    message = condition(obj, "Scheduled")["message"]
    assert f"LibvirtHost {host} does not expose storage pool fast to VMs" in message
    assert "defaultPool default is always allowed" in message
    assert obj["status"]["error"]["code"] == "POOL_NOT_ALLOWED"
    assert domains(operator, host) == {}
    assert volumes(operator, host, "default") == [] and volumes(operator, host, "fast") == []

    # The default pool alone is fine: the same host takes a VM that uses only it.
    make_vm(kube, namespace, "ok", hostRef=host, disks=[{"name": "root", "volume": {"size": "1Gi"}}])
    kube.wait_condition(VM, "ok", "Ready", "True", namespace=namespace, timeout=30)


def test_a_placed_vm_whose_namespace_is_no_longer_admitted_is_left_running_but_never_restarted(
        kube, operator, namespace, test_host_factory) -> None:
    host = uniq("revoke")
    make_host(kube, test_host_factory(host), host)
    vm = make_vm(kube, namespace, "svc", hostRef=host)
    uid = vm["metadata"]["uid"]
    kube.wait_condition(VM, "svc", "Ready", "True", namespace=namespace, timeout=30)

    kube.patch(HOST, host, {"spec": {"allowedNamespaces": ["someone-else"]}})
    obj = wait_reason(kube, namespace, "svc", "Ready", "NamespaceNotAllowed", timeout=40)
    ready = condition(obj, "Ready")
    assert ready["status"] == "False"
    assert "the running domain is left running" in ready["message"]
    assert obj["status"]["printableStatus"] == "Running"     # what the domain really does
    assert condition(obj, "Scheduled")["status"] == "True"   # it stays placed
    assert [s for u, s in domains(operator, host).values() if u == uid] == [RUNNING]

    # It stops (here: powered off behind the operator's back): runStrategy Always would restart it,
    # but the host no longer admits the namespace.
    operator.call(lambda: operator.runtime.pool.get(host).call(
        "test-inspect", lambda c: c.lookupByUUIDString(uid).destroy()))
    kube.wait_for(lambda: (kube.get(VM, "svc", namespace) or {}).get("status", {}).get("printableStatus") == "Stopped",
                  timeout=30, what="printableStatus Stopped")
    time.sleep(3)  # several event rounds: still not restarted
    assert [s for u, s in domains(operator, host).values() if u == uid] == [SHUTOFF]
    ready = condition(kube.get(VM, "svc", namespace), "Ready")
    assert ready["reason"] == "NamespaceNotAllowed" and "stays stopped" in ready["message"]

    # Admitted again: Always restarts it.
    kube.patch(HOST, host, {"spec": {"allowedNamespaces": None}})
    kube.wait_condition(VM, "svc", "Ready", "True", namespace=namespace, timeout=40)
    assert [s for u, s in domains(operator, host).values() if u == uid] == [RUNNING]


def test_iso_image_respects_allowed_namespaces_and_pools(kube, operator, namespace, test_host_factory) -> None:
    """Refused targets are reported per host and nothing is downloaded or uploaded (the URL is never
    fetched: resolving the targets comes first)."""
    closed, pooled = uniq("iso-closed"), uniq("iso-pooled")
    make_host(kube, test_host_factory(closed), closed, allowedNamespaces=[])
    make_host(kube, test_host_factory(pooled, pools=("default", "isos")), pooled, allowedPools=["default"])
    checksum = "sha256:" + "ab" * 32
    kube.create(ISO, {"metadata": {"name": "ns-refused"}, "spec": {
        "source": {"url": "http://127.0.0.1:9/never.iso"}, "checksum": checksum,
        "targets": {"hostNames": [closed]}}}, namespace)
    kube.create(ISO, {"metadata": {"name": "pool-refused"}, "spec": {
        "source": {"url": "http://127.0.0.1:9/never.iso"}, "checksum": checksum, "pool": "isos",
        "targets": {"hostNames": [pooled]}}}, namespace)

    def reason(name: str, expected: str) -> Any:
        obj = kube.get(ISO, name, namespace) or {}
        cond = condition(obj, "Ready")
        return obj if cond and cond["reason"] == expected else None

    obj = kube.wait_for(lambda: reason("ns-refused", "NamespaceNotAllowed"), timeout=30, what="NamespaceNotAllowed")
    (entry,) = obj["status"]["hosts"]
    assert entry["host"] == closed and entry["phase"] == "Pending"
    assert f"does not admit namespace {namespace}" in entry["message"]
    obj = kube.wait_for(lambda: reason("pool-refused", "PoolNotAllowed"), timeout=30, what="PoolNotAllowed")
    assert "storage pool isos to ISOImages" in obj["status"]["hosts"][0]["message"]
    assert volumes(operator, closed, "default") == [] and volumes(operator, pooled, "isos") == []
    for name in ("ns-refused", "pool-refused"):
        kube.delete(ISO, name, namespace)


@pytest.fixture(autouse=True)
def _cleanup(kube, namespace) -> Any:
    """Delete the test's VMs (while their hosts exist, so teardown runs), then the LibvirtHosts it made
    (cluster-scoped: namespaces do not isolate them)."""
    def host_names() -> set[str]:
        return {h["metadata"]["name"] for h in kube.custom.list_cluster_custom_object(
            "virt.libvirt-operator.io", "v1alpha1", HOST)["items"]}

    before = host_names()
    yield
    vms = kube.custom.list_namespaced_custom_object("virt.libvirt-operator.io", "v1alpha1", namespace, VM)["items"]
    for vm in vms:
        kube.delete(VM, vm["metadata"]["name"], namespace)
    for vm in vms:
        name = vm["metadata"]["name"]
        kube.wait_for(lambda n=name: kube.get(VM, n, namespace) is None, timeout=30, what=f"VM {name} deleted")
    for name in host_names() - before:
        kube.delete(HOST, name)

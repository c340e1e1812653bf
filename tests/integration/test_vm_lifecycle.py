"""VirtualMachine lifecycle on the real apiserver with libvirt test-driver hosts, driven by the real
operator in-process: run strategies, placement, deletion, adoption after a restart, spec never written."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Any

import pytest

from tests.harness.kube import GROUP, Kube, condition
from tests.harness.libvirt_module import libvirt

VM = "virtualmachines"
HOST = "libvirthosts"
RUNNING, SHUTOFF = 1, 5


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def make_host(kube: Kube, uri: str, name: str | None = None, labels: dict[str, str] | None = None) -> str:
    name = name or uniq("hv")
    kube.create(HOST, {"metadata": {"name": name, "labels": labels or {}}, "spec": {"uri": uri}})
    kube.wait_condition(HOST, name, "Ready", "True", timeout=30)
    return name


def make_vm(kube: Kube, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("memory", "128Mi")
    return kube.create(VM, {"metadata": {"name": name}, "spec": spec}, namespace)


def status(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    return (kube.get(VM, name, namespace) or {}).get("status") or {}


def wait_printable(kube: Kube, namespace: str, name: str, value: str, timeout: float = 30) -> dict[str, Any]:
    return kube.wait_for(lambda: (obj := kube.get(VM, name, namespace)) and
                         (obj.get("status") or {}).get("printableStatus") == value and obj,
                         timeout=timeout, what=f"{name} printableStatus={value}")


def on_host(operator: Any, host: str, fn: Any) -> Any:
    """Run fn(virConnect) on the operator's own connection (test:///file hosts are per connection)."""
    return operator.call(lambda: operator.runtime.pool.get(host).call("test-inspect", fn))


def domains(operator: Any, host: str) -> dict[str, tuple[str, int]]:
    return on_host(operator, host, lambda c: {d.name(): (d.UUIDString(), d.state()[0]) for d in c.listAllDomains()})


def volumes(operator: Any, host: str, pool: str = "default") -> list[str]:
    return on_host(operator, host, lambda c: sorted(v.name() for v in c.storagePoolLookupByName(pool).listAllVolumes()))


def domain_action(operator: Any, host: str, uid: str, action: str) -> None:
    on_host(operator, host, lambda c: getattr(c.lookupByUUIDString(uid), action)())


def event_reasons(kube: Kube, namespace: str, name: str) -> list[str]:
    return [e.reason for e in kube.events_for(namespace, name)]


def event_types(kube: Kube, namespace: str, name: str) -> list[tuple[str, str]]:
    return [(e.type, e.reason) for e in kube.events_for(namespace, name)]


def delete_and_wait(kube: Kube, namespace: str, name: str, timeout: float = 30) -> None:
    kube.delete(VM, name, namespace)
    kube.wait_for(lambda: kube.get(VM, name, namespace) is None, timeout=timeout, what=f"{name} deleted")


@pytest.fixture
def host(kube, operator, test_host_factory) -> str:
    name = uniq("hv")
    return make_host(kube, test_host_factory(name, cpus=8, memory_mib=8192), name)


def test_always_vm_runs_then_delete_removes_domain_and_volumes(kube, operator, namespace, host) -> None:
    vm = make_vm(kube, namespace, "web", hostRef=host, cpu=2,
                 disks=[{"name": "root", "bootOrder": 1, "volume": {"size": "1Gi"}},
                        {"name": "data", "volume": {"size": "256Mi"}}],
                 interfaces=[{"name": "nic0"}])
    uid = vm["metadata"]["uid"]
    obj = kube.wait_condition(VM, "web", "Ready", "True", namespace=namespace)
    st = obj["status"]
    dname = f"{namespace}_web"
    assert st["printableStatus"] == "Running"
    assert st["host"] == host and st["domainUUID"] == uid and st["domainName"] == dname
    assert st["domainType"] == "qemu"  # the test driver offers no kvm
    assert condition(obj, "Scheduled")["status"] == "True"
    assert condition(obj, "Ready")["reason"] == "Running"
    assert condition(obj, "Reconciling") is None and condition(obj, "Stalled") is None
    assert st["observedGeneration"] == obj["metadata"]["generation"]
    assert {(v["disk"], v["name"]) for v in st["volumes"]} == {("root", f"lvop-{uid}-root"), ("data", f"lvop-{uid}-data")}
    assert st.get("firstBootTime") and "error" not in st
    assert domains(operator, host) == {dname: (uid, RUNNING)}
    assert volumes(operator, host) == sorted([f"lvop-{uid}-root", f"lvop-{uid}-data"])
    # Placed, defined and started in one pass: one Event says all three.
    started = kube.wait_for(lambda: [e for e in kube.events_for(namespace, "web") if e.reason == "Started"],
                            what="the Started Event")
    assert [e.message for e in started] == [f"placed on LibvirtHost {host}; domain {dname} defined and started"]
    assert not {"Scheduled", "Defined"} & set(event_reasons(kube, namespace, "web"))

    delete_and_wait(kube, namespace, "web")
    assert domains(operator, host) == {}
    assert volumes(operator, host) == []


def test_halted_keeps_stopped_and_switching_strategy_starts_and_stops(kube, operator, namespace, host) -> None:
    vm = make_vm(kube, namespace, "cold", hostRef=host, runStrategy="Halted")
    uid = vm["metadata"]["uid"]
    obj = wait_printable(kube, namespace, "cold", "Stopped")
    ready = condition(obj, "Ready")
    assert ready["status"] == "True" and ready["reason"] == "Stopped"  # halted on purpose is healthy
    assert domains(operator, host)[f"{namespace}_cold"] == (uid, SHUTOFF)
    assert "firstBootTime" not in obj["status"]

    kube.patch(VM, "cold", {"spec": {"runStrategy": "Always"}}, namespace)
    wait_printable(kube, namespace, "cold", "Running")
    assert domains(operator, host)[f"{namespace}_cold"] == (uid, RUNNING)

    kube.patch(VM, "cold", {"spec": {"runStrategy": "Halted"}}, namespace)
    obj = wait_printable(kube, namespace, "cold", "Stopped")
    assert condition(obj, "Ready")["status"] == "True"
    assert domains(operator, host)[f"{namespace}_cold"] == (uid, SHUTOFF)
    assert "stopRequestedTime" not in obj["status"]
    delete_and_wait(kube, namespace, "cold")


def test_always_restarts_after_clean_shutdown_and_backs_off_after_crash(kube, operator, namespace, host) -> None:
    uid = make_vm(kube, namespace, "hard", hostRef=host)["metadata"]["uid"]
    wait_printable(kube, namespace, "hard", "Running")

    domain_action(operator, host, uid, "shutdown")  # clean guest shutdown: restart at once, no backoff
    kube.wait_for(lambda: domains(operator, host)[f"{namespace}_hard"][1] == RUNNING
                  and status(kube, namespace, "hard").get("printableStatus") == "Running", timeout=10,
                  what="restart after a clean shutdown")
    assert "startFailure" not in status(kube, namespace, "hard")

    t0 = time.monotonic()
    domain_action(operator, host, uid, "destroy")  # powered off from outside: a failure → backoff
    obj = wait_printable(kube, namespace, "hard", "CrashLoopBackOff", timeout=5)
    # The lifecycle event refreshed the status, not the periodic resync (every 10 s).
    assert time.monotonic() - t0 < 2.0
    assert obj["status"]["startFailure"]["consecutiveFailCount"] == 1
    assert condition(obj, "Ready")["status"] == "False"
    assert domains(operator, host)[f"{namespace}_hard"][1] == SHUTOFF
    wait_printable(kube, namespace, "hard", "Running", timeout=20)  # first backoff: 10 s
    kube.wait_for(lambda: "CrashLoopBackOff" in event_reasons(kube, namespace, "hard"), what="backoff event")
    delete_and_wait(kube, namespace, "hard")


def test_rerun_on_failure_restarts_after_failure_not_after_clean_shutdown(kube, operator, namespace, host) -> None:
    uid = make_vm(kube, namespace, "rerun", hostRef=host, runStrategy="RerunOnFailure")["metadata"]["uid"]
    wait_printable(kube, namespace, "rerun", "Running")
    domain_action(operator, host, uid, "destroy")
    obj = wait_printable(kube, namespace, "rerun", "CrashLoopBackOff", timeout=5)
    assert obj["status"]["startFailure"]["consecutiveFailCount"] == 1
    wait_printable(kube, namespace, "rerun", "Running", timeout=20)

    domain_action(operator, host, uid, "shutdown")  # clean: stays stopped, and that is Ready
    obj = wait_printable(kube, namespace, "rerun", "Stopped", timeout=5)
    assert condition(obj, "Ready")["status"] == "True"
    time.sleep(2)
    assert domains(operator, host)[f"{namespace}_rerun"][1] == SHUTOFF
    delete_and_wait(kube, namespace, "rerun")


@pytest.mark.parametrize("strategy", ["Once", "Manual"])
def test_once_and_manual_start_once_and_never_restart(kube, operator, namespace, host, strategy) -> None:
    name = strategy.lower()
    uid = make_vm(kube, namespace, name, hostRef=host, runStrategy=strategy)["metadata"]["uid"]
    wait_printable(kube, namespace, name, "Running")
    domain_action(operator, host, uid, "destroy" if strategy == "Once" else "shutdown")
    obj = wait_printable(kube, namespace, name, "Stopped", timeout=5)
    assert condition(obj, "Ready")["status"] == "True"
    time.sleep(2)
    assert domains(operator, host)[f"{namespace}_{name}"][1] == SHUTOFF
    assert status(kube, namespace, name)["printableStatus"] == "Stopped"
    if strategy == "Manual":  # the user starts it by other means: reported, never fought
        domain_action(operator, host, uid, "create")
        wait_printable(kube, namespace, name, "Running", timeout=5)
    delete_and_wait(kube, namespace, name)


def test_placement_by_selector_and_capacity(kube, operator, namespace, test_host_factory) -> None:
    zone = uniq("zone")
    small = make_host(kube, test_host_factory("small", cpus=1, memory_mib=1024), uniq("small"), {"zone": zone})
    big = make_host(kube, test_host_factory("big", cpus=8, memory_mib=2048), uniq("big"), {"zone": zone})
    other = make_host(kube, test_host_factory("other", cpus=64, memory_mib=65536), uniq("other"))
    # Needs 2 CPUs: only `big` in the zone fits (the much larger `other` is not selected).
    make_vm(kube, namespace, "two-cpu", cpu=2, hostSelector={"matchLabels": {"zone": zone}})
    obj = wait_printable(kube, namespace, "two-cpu", "Running")
    assert obj["status"]["host"] == big
    # Fits on either by CPU; most free memory wins: `big` (2048 - 128 MiB) over `small` (1024).
    # Reservations: a VM placed but not yet running still counts against the host.
    make_vm(kube, namespace, "fill", cpu=1, memory="1536Mi", hostSelector={"matchLabels": {"zone": zone}},
            runStrategy="Always")
    assert wait_printable(kube, namespace, "fill", "Running")["status"]["host"] == big
    # big now has 2048-128-1536 = 384 MiB free; small 1024 MiB: a 512 MiB VM goes to small.
    make_vm(kube, namespace, "third", cpu=1, memory="512Mi", hostSelector={"matchLabels": {"zone": zone}})
    assert wait_printable(kube, namespace, "third", "Running")["status"]["host"] == small
    assert other not in {status(kube, namespace, n)["host"] for n in ("two-cpu", "fill", "third")}
    for n in ("two-cpu", "fill", "third"):
        delete_and_wait(kube, namespace, n)


def test_no_fit_then_fits_when_a_host_appears(kube, operator, namespace, test_host_factory) -> None:
    zone = uniq("zone")
    make_vm(kube, namespace, "waiting", cpu=4, memory="2Gi", hostSelector={"matchLabels": {"zone": zone}})
    obj = wait_printable(kube, namespace, "waiting", "ErrorUnschedulable")
    sched = condition(obj, "Scheduled")
    assert sched["status"] == "False" and sched["reason"] == "NoSchedulableHost"
    assert obj["status"]["error"]["code"] == "NO_SCHEDULABLE_HOST"
    assert condition(obj, "Reconciling")["status"] == "True" and condition(obj, "Stalled") is None

    make_host(kube, test_host_factory("tiny", cpus=2, memory_mib=1024), uniq("tiny"), {"zone": zone})
    obj = kube.wait_for(lambda: (o := kube.get(VM, "waiting", namespace)) and
                        (condition(o, "Scheduled") or {}).get("reason") == "InsufficientResources" and o,
                        what="InsufficientResources")
    assert obj["status"]["printableStatus"] == "ErrorUnschedulable"
    assert obj["status"]["error"]["code"] == "INSUFFICIENT_RESOURCES"

    roomy = make_host(kube, test_host_factory("roomy", cpus=8, memory_mib=8192), uniq("roomy"), {"zone": zone})
    t0 = time.monotonic()
    obj = wait_printable(kube, namespace, "waiting", "Running", timeout=20)
    took = time.monotonic() - t0
    assert obj["status"]["host"] == roomy and "error" not in obj["status"]
    assert condition(obj, "Scheduled")["status"] == "True"
    assert took < 10, f"placement after the host appeared took {took:.1f}s"  # woken, not a slow backoff
    delete_and_wait(kube, namespace, "waiting")


def test_missing_iso_waits_for_media(kube, operator, namespace, host) -> None:
    make_vm(kube, namespace, "installer", hostRef=host,
            disks=[{"name": "root", "volume": {"size": "1Gi"}},
                   {"name": "media", "bootOrder": 1, "cdrom": {"isoImageRef": {"name": "nope"}}}])
    obj = wait_printable(kube, namespace, "installer", "WaitingForMedia")
    ready = condition(obj, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "ISONotFound"
    assert obj["status"]["error"]["code"] == "ISO_NOT_FOUND"
    assert condition(obj, "Scheduled")["status"] == "True"
    assert f"{namespace}_installer" not in domains(operator, host)
    # Expected waiting (defect 7): a Normal Event, no Warning.
    kube.wait_for(lambda: ("Normal", "WaitingForMedia") in event_types(kube, namespace, "installer"),
                  what="WaitingForMedia event")
    assert [e for e in event_types(kube, namespace, "installer") if e[0] == "Warning"] == []
    delete_and_wait(kube, namespace, "installer")


def test_a_vm_waiting_for_a_host_posts_no_warning(kube, operator, namespace) -> None:
    """Defect 7: a VM applied before any host it may use (GitOps order) waits quietly: Normal Events."""
    make_vm(kube, namespace, "early", hostSelector={"matchLabels": {"site": uniq("none")}})
    make_vm(kube, namespace, "pinned", hostRef=uniq("later"))
    for name in ("early", "pinned"):
        obj = wait_printable(kube, namespace, name, "ErrorUnschedulable")
        assert condition(obj, "Scheduled")["status"] == "False"
        kube.wait_for(lambda n=name: ("Normal", "WaitingForHost") in event_types(kube, namespace, n),
                      what=f"{name} WaitingForHost event")
        assert [e for e in event_types(kube, namespace, name) if e[0] == "Warning"] == []
        delete_and_wait(kube, namespace, name)


def test_spec_change_while_running_requires_restart(kube, operator, namespace, host) -> None:
    uid = make_vm(kube, namespace, "grow", hostRef=host)["metadata"]["uid"]
    wait_printable(kube, namespace, "grow", "Running")
    kube.patch(VM, "grow", {"spec": {"cpu": 2}}, namespace)
    obj = kube.wait_condition(VM, "grow", "RestartRequired", "True", namespace=namespace)
    assert obj["status"]["printableStatus"] == "Running"
    vcpus = on_host(operator, host, lambda c: c.lookupByUUIDString(uid).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert "<vcpu placement='static'>2</vcpu>" in vcpus
    domain_action(operator, host, uid, "shutdown")  # Always restarts it with the new definition
    kube.wait_for(lambda: condition(kube.get(VM, "grow", namespace), "RestartRequired") is None
                  and status(kube, namespace, "grow").get("printableStatus") == "Running",
                  timeout=15, what="RestartRequired cleared after a restart")
    delete_and_wait(kube, namespace, "grow")


def test_operator_never_writes_spec(kube, operator, namespace, host) -> None:
    make_vm(kube, namespace, "ro", hostRef=host, runStrategy="Halted",
            disks=[{"name": "root", "volume": {"size": "64Mi"}}])
    wait_printable(kube, namespace, "ro", "Stopped")
    kube.patch(VM, "ro", {"spec": {"runStrategy": "Always"}}, namespace)  # generation 2
    wait_printable(kube, namespace, "ro", "Running")
    time.sleep(2)  # let resyncs happen
    obj = kube.get(VM, "ro", namespace)
    assert obj["metadata"]["generation"] == 2
    assert obj["status"]["observedGeneration"] == 2
    assert obj["spec"]["runStrategy"] == "Always"
    managed = {(e["manager"], e.get("subresource")): e.get("fieldsV1") or {} for e in obj["metadata"]["managedFields"]}
    # The operator's writes: status and its finalizer through its own client; kopf writes nothing on a
    # VirtualMachine (no handler state, no finalizer of its own).
    assert ("libvirt-operator", "status") in managed and ("libvirt-operator", None) in managed
    for (manager, _sub), fields in managed.items():
        if manager in ("libvirt-operator", "kopf"):
            assert "f:spec" not in fields, (manager, fields)
    spec_owners = {m for (m, _sub), fields in managed.items() if "f:spec" in fields}
    assert len(spec_owners) == 1 and not spec_owners & {"libvirt-operator", "kopf"}  # only this test's client
    delete_and_wait(kube, namespace, "ro")


def test_deletion_with_host_gone_blocks_until_force_release(kube, operator, namespace, test_host_factory) -> None:
    hv = make_host(kube, test_host_factory("doomed", cpus=4, memory_mib=4096), uniq("doomed"))
    make_vm(kube, namespace, "orphan", hostRef=hv)
    wait_printable(kube, namespace, "orphan", "Running")
    kube.delete(HOST, hv)
    kube.wait_for(lambda: kube.get(HOST, hv) is None, what="host deleted")
    kube.delete(VM, "orphan", namespace)
    obj = kube.wait_condition(VM, "orphan", "DeletionBlocked", "True", namespace=namespace)
    assert obj["status"]["printableStatus"] == "Terminating"
    assert condition(obj, "DeletionBlocked")["reason"] == "HostNotFound"
    assert "force-release" in condition(obj, "DeletionBlocked")["message"]
    time.sleep(2)
    assert kube.get(VM, "orphan", namespace) is not None  # not released by itself
    kube.patch(VM, "orphan", {"metadata": {"annotations": {"virt.libvirt-operator.io/force-release": "true"}}},
               namespace)
    kube.wait_for(lambda: kube.get(VM, "orphan", namespace) is None, timeout=30, what="force-released")



def test_a_host_held_by_another_finalizer_counts_as_gone_once_deleted(kube, operator, namespace,
                                                                    test_host_factory) -> None:
    """`kubectl delete` of a LibvirtHost that another controller's finalizer holds: the object stays
    (Terminating), the operator forgets the host at once, and a VM deleted meanwhile is blocked with
    the same force-release advice as when the host object is gone, never torn down over a connection
    reopened from the object still seen."""
    hv = make_host(kube, test_host_factory("held", cpus=4, memory_mib=4096), uniq("held"))
    kube.patch(HOST, hv, {"metadata": {"finalizers": ["test.example/hold"]}})
    make_vm(kube, namespace, "on-held", hostRef=hv)
    wait_printable(kube, namespace, "on-held", "Running")
    try:
        kube.delete(HOST, hv)
        kube.wait_for(lambda: operator.runtime.pool.get(hv) is None, what="the operator forgot the host")
        assert (kube.get(HOST, hv) or {}).get("metadata", {}).get("deletionTimestamp")  # still there
        kube.delete(VM, "on-held", namespace)
        obj = kube.wait_condition(VM, "on-held", "DeletionBlocked", "True", namespace=namespace)
        blocked = condition(obj, "DeletionBlocked")
        assert blocked["reason"] == "HostNotFound" and "force-release" in blocked["message"], blocked
        assert operator.runtime.pool.get(hv) is None  # nothing reopened it
        kube.patch(VM, "on-held", {"metadata": {"annotations": {"virt.libvirt-operator.io/force-release": "true"}}},
                   namespace)
        kube.wait_for(lambda: kube.get(VM, "on-held", namespace) is None, timeout=30, what="force-released")
    finally:
        kube.patch(HOST, hv, {"metadata": {"finalizers": None}})
        kube.wait_for(lambda: kube.get(HOST, hv) is None, what="host gone")

def test_operator_restart_adopts_domains_without_duplicates(kube, operator, namespace) -> None:
    # test:///default is shared by every connection in this process (a file host would be a fresh
    # copy for the new operator); hold one connection so its state survives the restart.
    keep = libvirt.open("test:///default")
    try:
        hv = make_host(kube, "test:///default", uniq("shared"))
        uid = make_vm(kube, namespace, "survivor", hostRef=hv,
                      disks=[{"name": "root", "volume": {"size": "64Mi", "pool": "default-pool"}}])["metadata"]["uid"]
        wait_printable(kube, namespace, "survivor", "Running")
        dname = f"{namespace}_survivor"
        # Events are posted asynchronously (kopf's posting queue): Running can be seen before them.
        kube.wait_for(lambda: event_reasons(kube, namespace, "survivor").count("Started") == 1, what="Started event")
        assert "Defined" not in event_reasons(kube, namespace, "survivor")  # one Event: "defined and started"
        rv_before = status(kube, namespace, "survivor")

        operator.stop()
        assert keep.lookupByUUIDString(uid).state()[0] == RUNNING
        operator.start()
        time.sleep(3)  # resume handlers + a resync
        obj = kube.wait_condition(VM, "survivor", "Ready", "True", namespace=namespace)
        same = [d for d in keep.listAllDomains() if d.name() == dname]
        assert len(same) == 1 and same[0].UUIDString() == uid and same[0].state()[0] == RUNNING
        assert "Defined" not in event_reasons(kube, namespace, "survivor")  # adopted, not defined again
        assert event_reasons(kube, namespace, "survivor").count("Started") == 1
        assert obj["status"]["firstBootTime"] == rv_before["firstBootTime"]
        vols = [v.name() for v in keep.storagePoolLookupByName("default-pool").listAllVolumes()] \
            if "default-pool" in keep.listStoragePools() else []
        assert vols.count(f"lvop-{uid}-root") <= 1
        delete_and_wait(kube, namespace, "survivor")
        assert dname not in [d.name() for d in keep.listAllDomains()]
        kube.delete(HOST, hv)
    finally:
        keep.close()


def test_steady_state_uses_one_bulk_call_per_host(kube, operator, namespace, host) -> None:
    from prometheus_client import REGISTRY

    def calls(operation: str) -> float:
        return REGISTRY.get_sample_value("libvirt_operator_libvirt_calls_total",
                                         {"host": host, "operation": operation, "outcome": "ok"}) or 0.0

    uids = [make_vm(kube, namespace, f"vm{i}", hostRef=host)["metadata"]["uid"] for i in range(3)]
    for i in range(3):
        wait_printable(kube, namespace, f"vm{i}", "Running")
    time.sleep(0.5)
    lookups, bulk = calls("get_domain"), calls("list_domains")
    domain_action(operator, host, uids[1], "suspend")  # an event: the host's VMs are refreshed in bulk
    obj = wait_printable(kube, namespace, "vm1", "Paused", timeout=5)
    assert condition(obj, "Ready")["status"] == "False"
    domain_action(operator, host, uids[1], "resume")
    wait_printable(kube, namespace, "vm1", "Running", timeout=5)
    assert calls("list_domains") > bulk
    assert calls("get_domain") == lookups  # no per-VM lookups in steady state
    for i in range(3):
        delete_and_wait(kube, namespace, f"vm{i}")


def test_burst_of_selector_vms_spreads_within_capacity(kube, operator, namespace, test_host_factory) -> None:
    """20 VMs created at once for two hosts with room for exactly 10 each (by CPU): each placement
    sees the ones decided before it, even before their status lands: 10/10, none unschedulable."""
    from concurrent.futures import ThreadPoolExecutor

    zone = uniq("burst")
    hosts = [make_host(kube, test_host_factory(n, cpus=10, memory_mib=8192), uniq(n), {"zone": zone})
             for n in ("left", "right")]
    names = [f"b{i}" for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(lambda n: make_vm(kube, namespace, n, cpu=1, hostSelector={"matchLabels": {"zone": zone}}),
                      names))
    placed = {n: wait_printable(kube, namespace, n, "Running", timeout=60)["status"]["host"] for n in names}
    assert sorted(Counter(placed.values()).items()) == sorted((h, 10) for h in hosts), placed
    for h in hosts:
        assert len(domains(operator, h)) == 10
    for n in names:
        kube.delete(VM, n, namespace)
    for n in names:
        kube.wait_for(lambda n=n: kube.get(VM, n, namespace) is None, timeout=60, what=f"{n} deleted")


def test_an_event_refreshes_only_its_vm_and_subscribing_happens_once(kube, operator, namespace, host,
                                                                       monkeypatch) -> None:
    from prometheus_client import REGISTRY

    from libvirt_operator.handlers import vm_hosts, vm_reconcile

    def subscribes() -> float:
        return REGISTRY.get_sample_value("libvirt_operator_libvirt_calls_total",
                                         {"host": host, "operation": "subscribe", "outcome": "ok"}) or 0.0

    uids = [make_vm(kube, namespace, f"ev{i}", hostRef=host)["metadata"]["uid"] for i in range(4)]
    for i in range(4):
        wait_printable(kube, namespace, f"ev{i}", "Running")
    time.sleep(0.5)
    refreshes: Counter[str] = Counter()
    real = vm_reconcile.sync_vm

    async def counting(body, rt, view, **kw):
        if kw.get("observed") is not None:  # a run that used a host round's sighting
            refreshes[body["metadata"]["uid"]] += 1
        return await real(body, rt, view, **kw)

    monkeypatch.setattr(vm_reconcile, "sync_vm", counting)
    before = subscribes()
    t0 = time.monotonic()
    for _ in range(3):
        domain_action(operator, host, uids[1], "suspend")
        wait_printable(kube, namespace, "ev1", "Paused", timeout=5)
        domain_action(operator, host, uids[1], "resume")
        wait_printable(kube, namespace, "ev1", "Running", timeout=5)
    sweeps = 1 + int((time.monotonic() - t0) // vm_hosts.RESYNC_SECONDS)  # the periodic full sweep
    assert refreshes[uids[1]] >= 6
    others = {u: refreshes[u] for u in uids if u != uids[1]}
    assert all(n <= sweeps for n in others.values()), (others, sweeps)  # was one per event round
    assert subscribes() == before  # once per connection, not once per round
    for i in range(4):
        delete_and_wait(kube, namespace, f"ev{i}")


def test_a_volume_made_before_a_later_failure_is_in_status_and_is_deleted_with_the_vm(
        kube, operator, namespace, host) -> None:
    """Defect 12: the first disk's volume is created, the second disk's pool does not exist on the host
    (a real failure): status.volumes names the volume that exists, and deleting the VM removes it."""
    vm = make_vm(kube, namespace, "half", hostRef=host,
                 disks=[{"name": "root", "volume": {"size": "64Mi"}},
                        {"name": "data", "volume": {"size": "64Mi", "pool": "no-such-pool"}}])
    uid = vm["metadata"]["uid"]
    st = kube.wait_for(lambda: (s := status(kube, namespace, "half")).get("error") and s, what="the failure")
    assert st["error"]["code"] == "STORAGE_POOL_NOT_FOUND", st["error"]
    assert volumes(operator, host) == [f"lvop-{uid}-root"]
    assert st["volumes"] == [{"disk": "root", "pool": "default", "name": f"lvop-{uid}-root"}]
    delete_and_wait(kube, namespace, "half")
    assert volumes(operator, host) == []


def test_a_crash_looping_vm_turns_stalled_and_is_still_restarted(kube, operator, namespace, host) -> None:
    """Defect 8: after 3 failed runs in a row the VM reports Stalled=True (kstatus: Failed, so a GitOps
    tool stops waiting) and no longer Reconciling, while the backoff keeps restarting it."""
    uid = make_vm(kube, namespace, "loop", hostRef=host)["metadata"]["uid"]
    wait_printable(kube, namespace, "loop", "Running")
    for failures in (1, 2, 3):
        domain_action(operator, host, uid, "destroy")  # powered off from outside: a failure
        obj = kube.wait_for(lambda: (o := kube.get(VM, "loop", namespace))["status"].get(
            "startFailure", {}).get("consecutiveFailCount") == failures and o, timeout=10, what=f"failure {failures}")
        stalled, reconciling = condition(obj, "Stalled"), condition(obj, "Reconciling")
        if failures < 3:
            assert stalled is None and reconciling["status"] == "True", obj["status"]["conditions"]
            wait_printable(kube, namespace, "loop", "Running", timeout=10 * 2 ** failures + 10)
    assert stalled is not None and stalled["status"] == "True" and reconciling is None, obj["status"]["conditions"]
    assert condition(obj, "Ready")["status"] == "False"
    wait_printable(kube, namespace, "loop", "Running", timeout=60)  # still retried: 40 s backoff
    obj = kube.get(VM, "loop", namespace)
    assert condition(obj, "Stalled") is None and condition(obj, "Ready")["status"] == "True"
    delete_and_wait(kube, namespace, "loop")


def test_thin_volumes_that_overcommit_a_pool_are_reported(kube, operator, namespace, test_host_factory) -> None:
    """Defect 12: a 200 GiB thin disk in a 100 GiB pool (the test driver's pool size) is created (qcow2
    grows on demand), and the VM says that the pool is overcommitted (condition + Warning Event), as
    does the per-pool metric."""
    from prometheus_client import REGISTRY

    name = uniq("thin")
    hv = make_host(kube, test_host_factory(name, cpus=4, memory_mib=4096), name)
    make_vm(kube, namespace, "big", hostRef=hv, disks=[{"name": "root", "volume": {"size": "200Gi"}}])
    obj = wait_printable(kube, namespace, "big", "Running")
    over = condition(obj, "StorageOvercommitted")
    assert over is not None and over["status"] == "True" and "pool default" in over["message"], over
    assert condition(obj, "Ready")["status"] == "True"  # reported, not fatal
    kube.wait_for(lambda: ("Warning", "PoolOvercommitted") in event_types(kube, namespace, "big"),
                  what="PoolOvercommitted event")
    ratio = REGISTRY.get_sample_value("libvirt_operator_storage_pool_commitment_ratio", {"host": hv, "pool": "default"})
    assert ratio is not None and ratio >= 2.0, ratio

    make_vm(kube, namespace, "small", hostRef=hv, disks=[{"name": "root", "volume": {"size": "64Mi"}}])
    fits = wait_printable(kube, namespace, "small", "Running")  # its own volume fits, the pool does not
    assert condition(fits, "StorageOvercommitted")["status"] == "True"
    delete_and_wait(kube, namespace, "big")
    delete_and_wait(kube, namespace, "small")
    kube.delete(HOST, hv)



def test_a_vm_left_by_an_older_version_with_kopfs_finalizer_is_torn_down_and_released(kube, operator, namespace,
                                                                                        host) -> None:
    """Upgrade path: older operators put kopf's finalizer on every VM. This one keeps no kopf state on
    VirtualMachines; such a VM must neither stay Terminating forever nor lose its teardown."""
    kopf_finalizer = f"{GROUP}/finalizer"
    kube.create(VM, {"metadata": {"name": "legacy", "finalizers": [kopf_finalizer]},
                     "spec": {"hostRef": host, "memory": "128Mi",
                              "disks": [{"name": "root", "volume": {"size": "64Mi"}}]}}, namespace)
    obj = wait_printable(kube, namespace, "legacy", "Running")
    uid = obj["metadata"]["uid"]
    assert any(u == uid for u, _ in domains(operator, host).values())
    kube.wait_for(lambda: kopf_finalizer not in kube.get(VM, "legacy", namespace)["metadata"].get("finalizers", []),
                  timeout=15, what="kopf's finalizer removed by kopf (no handler needs it)")
    delete_and_wait(kube, namespace, "legacy")
    assert not any(u == uid for u, _ in domains(operator, host).values())  # torn down, not just released
    assert not [v for v in volumes(operator, host) if uid in v]


def test_a_watch_event_older_than_the_operators_own_write_does_not_take_the_placement_back(
        kube, operator, namespace, host) -> None:
    """The watch delivers the events of the operator's own first writes (the finalizer) after that
    work item has already read the answer of its later status write. Before, such an event replaced
    the cached VM: status.host was gone from the cache until the next event, and a run in that window
    (a lifecycle event's sighting queues one) searched the hosts for the VM's domain and posted
    "Adopted" for a VM placed a moment before (1 of 1,000 in the scale bench). Here the late event is
    handed to the watch handler as kopf would, then the VM is queued."""
    from libvirt_operator.handlers.startup import current_memo
    from libvirt_operator.handlers.vm import watch_vms
    from libvirt_operator.handlers.vm_state import state_of

    created = make_vm(kube, namespace, "late", hostRef=host)
    uid = created["metadata"]["uid"]
    kube.wait_condition(VM, "late", "Ready", "True", namespace=namespace)
    kube.wait_for(lambda: "Started" in event_reasons(kube, namespace, "late"), what="the Started Event")
    st, memo = state_of(operator.runtime), current_memo()
    late = {**created, "metadata": {**created["metadata"], "finalizers": []}, "status": {}}

    async def late_event_then_a_run() -> str | None:
        await watch_vms(type="MODIFIED", uid=uid, body=late, memo=memo)
        host_now = (st.vms[uid].get("status") or {}).get("host")
        st.retry.add(uid)
        return host_now

    assert operator.call(late_event_then_a_run) == host
    time.sleep(3)
    assert "Adopted" not in event_reasons(kube, namespace, "late")
    assert status(kube, namespace, "late")["host"] == host
    assert domains(operator, host) == {f"{namespace}_late": (uid, RUNNING)}
    delete_and_wait(kube, namespace, "late")

"""LibvirtHost reconcile against real libvirt: a real libvirtd on loopback and the test driver."""

from __future__ import annotations

import uuid

from prometheus_client import REGISTRY, generate_latest

from tests.harness.kube import condition


def _host_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def test_real_libvirtd_host_becomes_ready_with_capacity(kube, operator, libvirtd) -> None:
    name = _host_name("real")
    kube.create("libvirthosts", {"metadata": {"name": name}, "spec": {"uri": libvirtd.uri, "insecure": True}})
    host = kube.wait_condition("libvirthosts", name, "Ready", "True", timeout=60)
    status = host["status"]
    assert status["capacity"]["cpus"] >= 1
    assert status["capacity"]["memory"].endswith(("Mi", "Gi"))
    assert status["hypervisor"].startswith("QEMU ")
    assert "qemu" in status["domainTypes"]
    # libvirt lists kvm whenever /dev/kvm exists; the operator only reports it when the CPU can do it
    hardware_virt = any(flag in open("/proc/cpuinfo").read().split() for flag in ("vmx", "svm"))
    assert ("kvm" in status["domainTypes"]) == hardware_virt
    assert status["libvirtVersion"].count(".") == 2
    assert condition(host, "Reachable")["status"] == "True"
    assert status["observedGeneration"] == host["metadata"]["generation"]
    assert "error" not in status
    kube.delete("libvirthosts", name)


def test_unreachable_uri_reports_a_clear_reason(kube, operator) -> None:
    name = _host_name("gone")
    kube.create("libvirthosts", {"metadata": {"name": name},
                                 "spec": {"uri": "qemu+tcp://127.0.0.1:1/system", "insecure": True}})
    host = kube.wait_condition("libvirthosts", name, "Ready", "False", timeout=60)
    ready = condition(host, "Ready")
    assert ready["reason"] == "HostUnreachable"
    assert "127.0.0.1:1" in ready["message"]
    assert condition(host, "Reachable")["status"] == "False"
    assert condition(host, "Reconciling")["status"] == "True"  # retryable: still trying
    assert host["status"]["error"]["code"] == "HOST_UNREACHABLE"
    events = kube.core.list_event_for_all_namespaces(field_selector=f"involvedObject.name={name}").items
    assert any(e.reason == "HostUnreachable" and e.type == "Warning" for e in events)
    kube.delete("libvirthosts", name)


def test_test_driver_host_reports_the_file_capacity(kube, operator, test_host_factory) -> None:
    name = _host_name("file")
    uri = test_host_factory(name, cpus=12, memory_mib=6144)
    kube.create("libvirthosts", {"metadata": {"name": name}, "spec": {"uri": uri}})
    host = kube.wait_condition("libvirthosts", name, "Ready", "True", timeout=30)
    assert host["status"]["capacity"] == {"cpus": 12, "memory": "6Gi"}
    assert host["status"]["domainTypes"] == ["test"]
    kube.delete("libvirthosts", name)


def test_missing_credentials_secret_is_reported(kube, operator) -> None:
    name = _host_name("creds")
    kube.create("libvirthosts", {"metadata": {"name": name}, "spec": {
        "uri": "qemu+ssh://root@127.0.0.1:1/system",
        "credentialsSecretRef": {"name": "nope", "namespace": "default"}}})
    host = kube.wait_condition("libvirthosts", name, "Ready", "False", timeout=30)
    assert condition(host, "Ready")["reason"] == "CredentialsNotFound"
    assert "default/nope" in condition(host, "Ready")["message"]
    kube.delete("libvirthosts", name)


def test_reconcile_metrics_use_controller_runtime_names(kube, operator, test_host_factory) -> None:
    name = _host_name("metrics")
    kube.create("libvirthosts", {"metadata": {"name": name}, "spec": {"uri": test_host_factory(name)}})
    kube.wait_condition("libvirthosts", name, "Ready", "True", timeout=30)
    text = generate_latest(REGISTRY).decode()
    assert 'controller_runtime_reconcile_time_seconds_bucket{controller="libvirthost"' in text
    assert 'controller_runtime_reconcile_total{controller="libvirthost",result="success"}' in text
    assert "controller_runtime_reconcile_errors_total" in text
    assert f'libvirt_operator_libvirt_call_duration_seconds_count{{host="{name}",operation="probe"}}' in text
    kube.delete("libvirthosts", name)


def test_dropped_connection_is_detected_and_reopened(kube, operator, libvirtd_factory) -> None:
    from tests.harness.libvirt_hosts import LibvirtDaemon

    daemon = libvirtd_factory("flaky")
    name = _host_name("flaky")
    kube.create("libvirthosts", {"metadata": {"name": name},
                                 "spec": {"uri": daemon.uri, "insecure": True, "probeIntervalSeconds": 5}})
    kube.wait_condition("libvirthosts", name, "Ready", "True", timeout=60)
    port, root = daemon.port, daemon.root
    daemon.stop()
    host = kube.wait_condition("libvirthosts", name, "Ready", "False", timeout=60)
    assert condition(host, "Ready")["reason"] in ("HostUnreachable", "LibvirtTimeout")
    with LibvirtDaemon(name="flaky-again", root=root, port=port):
        kube.wait_condition("libvirthosts", name, "Ready", "True", timeout=60)
    kube.delete("libvirthosts", name)


def test_a_deleted_host_is_not_reconnected_by_work_that_read_it_before_and_comes_back_when_recreated(
        kube, operator, test_host_factory) -> None:
    """Work that read the LibvirtHost before its deletion (a reconcile in flight) asks for its connection
    after the operator forgot it: it gets HOST_NOT_FOUND, and no connection is opened that no daemon of
    the host would ever close. The same name created again is connected and Ready again."""
    from libvirt_operator.core.errors import AppError, ErrorCode
    from libvirt_operator.reconcile.host import host_connection

    name = _host_name("forgotten")
    uri = test_host_factory(name)
    kube.create("libvirthosts", {"metadata": {"name": name}, "spec": {"uri": uri}})
    before = kube.wait_condition("libvirthosts", name, "Ready", "True", timeout=30)
    rt = operator.runtime
    assert rt.pool.get(name) is not None
    kube.delete("libvirthosts", name)
    kube.wait_for(lambda: rt.pool.get(name) is None
                  and REGISTRY.get_sample_value("libvirt_operator_host_ready", {"host": name}) is None,
                  what="the operator forgot the deleted host")

    async def late_work() -> str:
        try:
            await host_connection(rt, name, before)
        except AppError as err:
            return err.code.value
        return "connected"

    assert operator.call(late_work) == ErrorCode.HOST_NOT_FOUND.value
    assert rt.pool.get(name) is None  # nothing reopened

    kube.create("libvirthosts", {"metadata": {"name": name}, "spec": {"uri": uri}})
    again = kube.wait_condition("libvirthosts", name, "Ready", "True", timeout=30)
    assert again["metadata"]["uid"] != before["metadata"]["uid"] and rt.pool.get(name) is not None
    assert operator.call(late_work) == "connected"

    # kopf handles each object (uid) apart: the old host's deletion may be processed after the new host
    # of that name was added (delete + create, as a GitOps replace does). Its handlers, run late as kopf
    # would run them, leave the new host's view entry, connection and series alone.
    from libvirt_operator.handlers.host import forget_host
    from libvirt_operator.handlers.startup import current_memo
    from libvirt_operator.handlers.vm import watch_hosts
    from libvirt_operator.handlers.vm_state import state_of

    memo = current_memo()
    connection = rt.pool.get(name)

    async def old_deletion_processed_late() -> None:
        await watch_hosts(type="DELETED", name=name, body=before, memo=memo)
        await forget_host(name=name, body=before, memo=memo)

    operator.call(old_deletion_processed_late)
    assert state_of(rt).hosts[name]["metadata"]["uid"] == again["metadata"]["uid"]
    assert rt.pool.get(name) is connection and not connection.closed
    assert REGISTRY.get_sample_value("libvirt_operator_host_ready", {"host": name}) == 1
    assert operator.call(late_work) == "connected"
    kube.delete("libvirthosts", name)


def test_a_host_daemon_winding_down_leaves_the_next_daemon_of_that_name_alone(operator) -> None:
    """A host deleted and re-created under one name is two objects to kopf, each with its own per-host
    daemon: the old one may still be winding down after the new one started. Before, the old one's
    exit dropped the shared wake-up and the pending lifecycle events of the name, so the new host's
    VMs heard of libvirt's events only at the next 10 s sweep. Two daemons of a name no LibvirtHost
    has (no connection: they only wait), started and stopped in that order, show it."""
    import asyncio

    from libvirt_operator.handlers.startup import current_memo
    from libvirt_operator.handlers.vm_hosts import host_vm_sync
    from libvirt_operator.handlers.vm_state import state_of

    class Stopped:  # what kopf hands a daemon: truthy once stopped, awaitable
        def __init__(self) -> None:
            self.event = asyncio.Event()

        def __bool__(self) -> bool:
            return self.event.is_set()

        async def wait(self) -> None:
            await self.event.wait()

    name = _host_name("twice")
    memo = current_memo()
    st = state_of(operator.runtime)

    async def old_then_new() -> tuple[bool, set[str] | None, bool, bool]:
        old_stopped, new_stopped = Stopped(), Stopped()
        old = asyncio.ensure_future(host_vm_sync(name=name, stopped=old_stopped, memo=memo))
        await asyncio.sleep(0.05)
        new = asyncio.ensure_future(host_vm_sync(name=name, stopped=new_stopped, memo=memo))
        await asyncio.sleep(0.05)
        new_wake = st.host_wake[name]
        st.dirty[name] = {"uid-of-a-vm-on-the-new-host"}  # an event the new daemon has yet to act on
        old_stopped.event.set()
        await asyncio.wait_for(old, 10)
        kept = st.host_wake.get(name) is new_wake, st.dirty.get(name)
        new_stopped.event.set()
        await asyncio.wait_for(new, 10)
        return *kept, name in st.host_wake, name in st.dirty

    wake_kept, dirty_kept, wake_left, dirty_left = operator.call(old_then_new)
    assert wake_kept and dirty_kept == {"uid-of-a-vm-on-the-new-host"}
    assert not wake_left and not dirty_left  # the last one out cleans up

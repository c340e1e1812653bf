"""Faults on the VM create and delete paths, on real parts: the operator runs as its own process and is
killed with SIGKILL at the worst moments, two real libvirtd hosts (QEMU/TCG) match the VM's
hostSelector, and the test apiserver holds the objects. Every test ends with an inventory taken
from the hosts themselves: at most one domain per VM UUID, no domain or volume of a deleted VM,
no VirtualMachine stuck behind a finalizer."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness.kube import Kube
from tests.harness.libvirt_module import libvirt
from tests.harness.operator_process import OperatorProcess

VM, HOST = "virtualmachines", "libvirthosts"
pytestmark = pytest.mark.usefixtures("without_session_operator")


@pytest.fixture(scope="module")
def daemons(libvirtd_factory) -> list[Any]:
    return libvirtd_factory.many(2)


class Hosts:
    """Two LibvirtHosts (one per daemon) labelled for this test only; the test's libvirt connections."""

    def __init__(self, kube: Kube, daemons: list[Any]) -> None:
        self.kube = kube
        self.label = f"fault-{uuid.uuid4().hex[:6]}"
        self.names = [f"{self.label}-{i}" for i in range(len(daemons))]
        self.daemons = dict(zip(self.names, daemons))
        self.conns = {name: d.connect() for name, d in self.daemons.items()}
        self.uids: list[str] = []  # every VM the test made (cleanup)
        for name, d in self.daemons.items():
            kube.create(HOST, {"metadata": {"name": name, "labels": {"fault": self.label}},
                               "spec": {"uri": d.uri, "insecure": True, "probeIntervalSeconds": 5}})

    def domains_of(self, uid: str) -> dict[str, int]:
        """host → state of the domain with this UUID, for every host that has one."""
        found = {}
        for name, conn in self.conns.items():
            try:
                found[name] = conn.lookupByUUIDString(uid).state()[0]
            except libvirt.libvirtError:
                pass
        return found

    def volumes_of(self, uid: str) -> dict[str, list[str]]:
        found = {}
        for name, conn in self.conns.items():
            pool = conn.storagePoolLookupByName("default")
            pool.refresh(0)
            vols = sorted(v.name() for v in pool.listAllVolumes() if v.name().startswith(f"lvop-{uid}"))
            if vols:
                found[name] = vols
        return found

    def unlabel(self, name: str) -> None:
        """An admin takes the host out of the selector (e.g. to drain it)."""
        self.kube.patch(HOST, name, {"metadata": {"labels": {"fault": None}}})

    def remove_everything_of(self, uid: str) -> None:
        """Test cleanup only (after the assertions): leave the shared daemons empty."""
        for conn in self.conns.values():
            with contextlib.suppress(libvirt.libvirtError):
                dom = conn.lookupByUUIDString(uid)
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        for conn in self.conns.values():
            for vol in conn.storagePoolLookupByName("default").listAllVolumes():
                if vol.name().startswith(f"lvop-{uid}"):
                    with contextlib.suppress(libvirt.libvirtError):
                        vol.delete(0)

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()


@pytest.fixture
def setup(kube, kubeconfig, daemons, tmp_path) -> Iterator[tuple[Kube, Hosts, OperatorProcess, str]]:
    namespace = kube.new_namespace("fault")
    hosts = Hosts(kube, daemons)
    op = OperatorProcess(kubeconfig, tmp_path, namespaces=(namespace,)).start()
    try:
        for name in hosts.names:
            kube.wait_condition(HOST, name, "Ready", "True", timeout=60)
        yield kube, hosts, op, namespace
    finally:
        if not op.alive():
            op.start()
        for obj in kube.custom.list_namespaced_custom_object("virt.libvirt-operator.io", "v1alpha1", namespace,
                                                             VM)["items"]:
            kube.delete(VM, obj["metadata"]["name"], namespace)
        with contextlib.suppress(AssertionError):
            kube.wait_for(lambda: not kube.custom.list_namespaced_custom_object(
                "virt.libvirt-operator.io", "v1alpha1", namespace, VM)["items"], timeout=60, what="VMs released")
        for name in hosts.names:
            kube.delete(HOST, name)
        kube.wait_for(lambda: all(kube.get(HOST, n) is None for n in hosts.names), timeout=60,
                      what="test hosts deleted")
        op.stop()
        for uid in hosts.uids:
            hosts.remove_everything_of(uid)
        hosts.close()
        kube.core.delete_namespace(namespace)


def make_vm(kube: Kube, hosts: Hosts, namespace: str, name: str, host_ref: str | None = None) -> str:
    where: dict[str, Any] = {"hostRef": host_ref} if host_ref else {
        "hostSelector": {"matchLabels": {"fault": hosts.label}}}
    vm = kube.create(VM, {"metadata": {"name": name}, "spec": {
        **where, "runStrategy": "Always", "memory": "64Mi",
        "domainType": "qemu", "disks": [{"name": "root", "volume": {"size": "16Mi"}}]}}, namespace)
    hosts.uids.append(vm["metadata"]["uid"])
    return vm["metadata"]["uid"]


def status(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    return (kube.get(VM, name, namespace) or {}).get("status") or {}


def kill_at_first_trace(kube: Kube, hosts: Hosts, op: OperatorProcess, namespace: str, name: str,
                        uid: str) -> str:
    """SIGKILL the operator as soon as anything of the VM exists: its domain on a host or a host in
    its status, whichever comes first. Returns the host that holds that trace."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        on = hosts.domains_of(uid)
        placed = status(kube, namespace, name).get("host")
        if on or placed:
            op.kill()
            return placed or next(iter(on))
        time.sleep(0.005)
    raise AssertionError(f"nothing of the VM appeared within 60 s\n{op.tail()}")


def wait_running(kube: Kube, op: OperatorProcess, namespace: str, name: str, timeout: float = 60) -> dict[str, Any]:
    try:
        return kube.wait_for(lambda: (s := status(kube, namespace, name)).get("printableStatus") == "Running" and s,
                             timeout=timeout, what=f"{name} Running")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{op.tail()}") from None


def assert_gone_everywhere(kube: Kube, hosts: Hosts, op: OperatorProcess, namespace: str, name: str,
                           uid: str) -> None:
    try:
        kube.wait_for(lambda: kube.get(VM, name, namespace) is None, timeout=60,
                      what=f"{name} released (no finalizer stuck)")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{op.tail()}") from None
    assert hosts.domains_of(uid) == {}, "a domain of the deleted VM is left on a host"
    assert hosts.volumes_of(uid) == {}, "a volume of the deleted VM is left on a host"


def test_a_kill_between_the_steps_of_a_create_never_runs_the_vm_on_two_hosts(setup) -> None:
    """Defect 1: the operator dies right after the first step of a create. The admin then takes that
    host out of the VM's selector; the restarted operator must keep the VM where it was placed, not
    place it again on the other host (the same UUID running twice)."""
    kube, hosts, op, namespace = setup
    uid = make_vm(kube, hosts, namespace, "twice")
    first = kill_at_first_trace(kube, hosts, op, namespace, "twice", uid)
    hosts.unlabel(first)
    op.start()
    wait_running(kube, op, namespace, "twice")
    time.sleep(3)  # a resync round and a probe: time for a second placement to show
    assert hosts.domains_of(uid) == {first: libvirt.VIR_DOMAIN_RUNNING}
    assert status(kube, namespace, "twice")["host"] == first
    assert list(hosts.volumes_of(uid)) == [first]
    kube.delete(VM, "twice", namespace)
    assert_gone_everywhere(kube, hosts, op, namespace, "twice", uid)


def test_a_vm_deleted_while_the_operator_was_killed_mid_create_leaves_nothing(setup) -> None:
    """Defects 1 and 9: killed right after the first step of a create, the VM deleted while no operator
    runs: the next operator removes its domain and volumes wherever they are, then releases it."""
    kube, hosts, op, namespace = setup
    uid = make_vm(kube, hosts, namespace, "leak")
    kill_at_first_trace(kube, hosts, op, namespace, "leak", uid)
    kube.delete(VM, "leak", namespace)
    op.start()
    assert_gone_everywhere(kube, hosts, op, namespace, "leak", uid)


def _running_then_status_lost(kube: Kube, hosts: Hosts, op: OperatorProcess, namespace: str, name: str) -> tuple[str, str]:
    """A VM running on a host whose status then loses `host` while the operator is down (a status
    rewritten by another client, or restored without it). The probe has counted the VM on its host
    first, so a fresh placement would prefer the other, emptier host."""
    uid = make_vm(kube, hosts, namespace, name)
    placed = wait_running(kube, op, namespace, name)["host"]
    kube.wait_for(lambda: ((kube.get(HOST, placed) or {}).get("status") or {}).get("allocated", {}).get("cpus"),
                  timeout=30, what="the host's probe counting the VM")
    op.kill()
    kube.custom.patch_namespaced_custom_object_status(
        "virt.libvirt-operator.io", "v1alpha1", namespace, VM, name,
        {"status": {"host": None, "domainName": None, "domainUUID": None, "volumes": None}})
    return uid, placed


def test_a_vm_whose_status_lost_its_host_adopts_its_domain_instead_of_creating_another(setup) -> None:
    """Defect 1 (the look-before-placing half): the domain is found by UUID on the host it runs on."""
    kube, hosts, op, namespace = setup
    uid, placed = _running_then_status_lost(kube, hosts, op, namespace, "adopt")
    op.start()
    kube.wait_for(lambda: status(kube, namespace, "adopt").get("host"), timeout=60, what="placed again")
    wait_running(kube, op, namespace, "adopt")
    time.sleep(3)
    assert status(kube, namespace, "adopt")["host"] == placed
    assert hosts.domains_of(uid) == {placed: libvirt.VIR_DOMAIN_RUNNING}
    kube.delete(VM, "adopt", namespace)
    assert_gone_everywhere(kube, hosts, op, namespace, "adopt", uid)


def test_deleting_a_vm_whose_status_names_no_host_tears_down_its_domain_and_volumes(setup) -> None:
    """Defect 9: teardown finds the domain and volumes by UUID on every host, not by status.host."""
    kube, hosts, op, namespace = setup
    uid, placed = _running_then_status_lost(kube, hosts, op, namespace, "orphan")
    assert hosts.volumes_of(uid) == {placed: [f"lvop-{uid}-root"]}
    kube.delete(VM, "orphan", namespace)
    op.start()
    assert_gone_everywhere(kube, hosts, op, namespace, "orphan", uid)


def test_an_operator_restart_leaves_healthy_vms_alone(setup) -> None:
    """Defect 11: after a restart every VM is looked at again before the operator has seen any host;
    a VM that runs fine must not flip to HostNotFound (status or Warning Event) meanwhile."""
    kube, hosts, op, namespace = setup
    names = [f"vm{i}" for i in range(4)]
    for name in names:
        make_vm(kube, hosts, namespace, name)
    for name in names:
        wait_running(kube, op, namespace, name)
    for restart in range(2):
        op.stop()
        op.start()
        seen: set[str] = set()
        deadline = time.monotonic() + 12  # resume handlers, resync rounds and a probe
        while time.monotonic() < deadline:
            for name in names:
                st = status(kube, namespace, name)
                seen.add(st.get("printableStatus") or "")
                seen.update(c.get("reason") or "" for c in st.get("conditions") or [])
            time.sleep(0.1)
        assert "HostNotFound" not in seen and seen >= {"Running"}, (restart, seen, op.tail())
        warnings = [(e.involved_object.name, e.reason) for e in kube.core.list_namespaced_event(namespace).items
                    if e.type == "Warning"]
        assert warnings == [], warnings


def _kill_qemu(hosts: Hosts, host: str, domain: str) -> None:
    pid = int((hosts.daemons[host].run_dir / "qemu" / f"{domain}.pid").read_text().strip())
    os.kill(pid, signal.SIGKILL)


def _events(kube: Kube, namespace: str, name: str) -> list[tuple[str, str]]:
    return [(e.type, e.reason) for e in kube.events_for(namespace, name)]


def test_a_killed_qemu_is_reported_as_a_crash_not_as_a_clean_stop(setup) -> None:
    """Defect 12: QEMU killed under a Manual VM: status.error DOMAIN_CRASHED, Ready=False, a Warning
    Event; under an Always VM the same Event, and it runs again."""
    kube, hosts, op, namespace = setup
    make_vm(kube, hosts, namespace, "manual")
    kube.patch(VM, "manual", {"spec": {"runStrategy": "Manual"}}, namespace)
    make_vm(kube, hosts, namespace, "always")
    for name in ("manual", "always"):
        st = wait_running(kube, op, namespace, name)
        _kill_qemu(hosts, st["host"], st["domainName"])
    crashed = kube.wait_for(lambda: (s := status(kube, namespace, "manual")).get("error", {}).get("code")
                            == "DOMAIN_CRASHED" and s, timeout=30, what="manual VM reports the crash")
    ready = next(c for c in crashed["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "DomainCrashed", ready
    # The status is written before the Event is posted: under load the Event can lag a moment.
    kube.wait_for(lambda: ("Warning", "DomainCrashed") in _events(kube, namespace, "manual"), timeout=30,
                  what="crash event of the Manual VM")
    kube.wait_for(lambda: ("Warning", "DomainCrashed") in _events(kube, namespace, "always"), timeout=30,
                  what="crash event of the Always VM")
    wait_running(kube, op, namespace, "always", timeout=60)  # after the crash-loop backoff (10 s)
    assert "error" not in status(kube, namespace, "always")


def test_a_pinned_vm_killed_mid_create_runs_once_where_it_is_pinned(setup) -> None:
    """kill -9 right after the first step of a hostRef VM's create: the next operator finishes it,
    one domain, one volume, on that host."""
    kube, hosts, op, namespace = setup
    target = hosts.names[1]
    uid = make_vm(kube, hosts, namespace, "pinned", host_ref=target)
    kill_at_first_trace(kube, hosts, op, namespace, "pinned", uid)
    op.start()
    wait_running(kube, op, namespace, "pinned")
    assert hosts.domains_of(uid) == {target: libvirt.VIR_DOMAIN_RUNNING}
    assert hosts.volumes_of(uid) == {target: [f"lvop-{uid}-root"]}
    kube.delete(VM, "pinned", namespace)
    assert_gone_everywhere(kube, hosts, op, namespace, "pinned", uid)


@pytest.mark.parametrize("step", ["destroyed", "undefined"])
def test_a_kill_in_the_middle_of_a_delete_is_finished_by_the_next_operator(setup, step) -> None:
    """kill -9 while the teardown runs (the domain powered off, or already undefined with its volume
    maybe still there): the next operator finishes it and releases the VM; nothing is left."""
    kube, hosts, op, namespace = setup
    uid = make_vm(kube, hosts, namespace, "bye")
    placed = wait_running(kube, op, namespace, "bye")["host"]
    kube.delete(VM, "bye", namespace)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = hosts.domains_of(uid).get(placed)
        if (step == "destroyed" and state != libvirt.VIR_DOMAIN_RUNNING) or (step == "undefined" and state is None):
            op.kill()
            break
        time.sleep(0.005)
    else:
        raise AssertionError(f"the teardown did not reach {step}\n{op.tail()}")
    op.start()
    assert_gone_everywhere(kube, hosts, op, namespace, "bye", uid)

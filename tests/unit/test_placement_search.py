"""The look-before-placing search (reconcile.vm_placement.find_own_domain) with this process's bulk host
lists (VmState.absent_from): a host is skipped only when its list proves the UUID is not there, so a
domain defined before the operator started is still found and adopted, never defined a second time."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import pytest

from libvirt_operator.adapters.libvirt import domains
from libvirt_operator.core.api.vm import VirtualMachineSpec
from libvirt_operator.core.domain import DomainObservation, PowerState
from libvirt_operator.core.settings import Settings
from libvirt_operator.handlers import vm_hosts
from libvirt_operator.handlers.vm_state import VmState
from libvirt_operator.reconcile import plan
from libvirt_operator.reconcile.runtime import Runtime
from libvirt_operator.reconcile.vm_placement import find_own_domain, place
from libvirt_operator.reconcile.vm_types import Stage

MiB = 2**20
HOSTS = ("h0", "h1", "h2")


class FakeHost:
    """One libvirt host: its domains (uuid → running), and the calls it was asked."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.domains: dict[str, bool] = {}
        self.calls: Counter[str] = Counter()

    async def call(self, operation: str, fn: Any, timeout: float | None = None) -> Any:
        self.calls[operation] += 1
        if operation == "list_domains":
            return {u: DomainObservation(PowerState.RUNNING if up else PowerState.SHUTOFF, uuid=u)
                    for u, up in self.domains.items()}
        if operation == "get_domain":
            return fn(self)
        raise AssertionError(f"unexpected libvirt call {operation}")


class FakePool:
    def __init__(self) -> None:
        self.hosts = {n: FakeHost(n) for n in HOSTS}

    def get(self, name: str) -> FakeHost | None:
        return self.hosts.get(name)

    def asked(self) -> dict[str, int]:
        return {n: h.calls["get_domain"] for n, h in self.hosts.items() if h.calls["get_domain"]}


def fake_get_domain(host: FakeHost, uid: str) -> domains.DomainDetails | None:
    if uid not in host.domains:
        return None
    obs = DomainObservation(PowerState.RUNNING if host.domains[uid] else PowerState.SHUTOFF, uuid=uid)
    return domains.DomainDetails(obs, domains.DomainMetadata(None, None), None, {})


def host_obj(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"zone": "z"}}, "spec": {"uri": "test:///default"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                       "capacity": {"cpus": 8, "memory": "64Gi"}, "allocated": {"cpus": 0, "memory": "0"}}}


def vm_obj(uid: str) -> dict[str, Any]:
    return {"metadata": {"uid": uid, "namespace": "ns", "name": f"vm-{uid}", "generation": 1},
            "spec": {"cpu": 1, "memory": "64Mi", "hostSelector": {"matchLabels": {"zone": "z"}}}, "status": {}}


@pytest.fixture
def world(monkeypatch):
    monkeypatch.setattr(domains, "get_domain", fake_get_domain)

    async def no_orphan_check(*_: Any) -> None:  # not what this is about
        return None

    monkeypatch.setattr(vm_hosts, "check_orphans", no_orphan_check)
    pool = FakePool()
    rt = Runtime(settings=Settings(knowledge_base_enabled=False), pool=pool, kube=None)  # type: ignore[arg-type]
    st = VmState()
    st.hosts.update({n: host_obj(n) for n in HOSTS})
    return rt, st, pool


async def list_all(rt: Runtime, st: VmState, pool: FakePool) -> None:
    """Each host's round (handlers.vm_hosts): one bulk list, remembered for the placement search."""
    for name, host in pool.hosts.items():
        await vm_hosts.resync_host(rt, st, name, host)


async def test_a_domain_defined_before_the_operator_started_is_adopted_not_defined_again(world) -> None:
    rt, st, pool = world
    pool.hosts["h1"].domains["old"] = True  # left by an earlier operator process (status since lost)
    st.vms["old"] = vm_obj("old")
    st.index("old")
    await list_all(rt, st, pool)
    view = dataclasses.replace(st.view(rt), record_placement=None)
    spec = VirtualMachineSpec.model_validate(st.vms["old"]["spec"])
    events: list[Any] = []
    status: dict[str, Any] = {}
    stage = Stage()
    host = await place(spec, st.vms["old"]["metadata"], 1, st.vms["old"], status, view, rt, events, None, stage)
    assert host == "h1" and status["host"] == "h1"
    assert [e[1] for e in events] == ["Adopted"] and not stage.placed_fresh  # the full path looks it up
    assert pool.asked() == {"h1": 1}  # the hosts whose list proves it absent are not asked

    # A new VM in a burst: every host's list proves it absent, so no host is asked at all, and the
    # full path need not look it up on the chosen host either.
    st.vms["new"] = vm_obj("new")
    st.index("new")
    events, status, stage = [], {}, Stage()
    host = await place(spec, st.vms["new"]["metadata"], 1, st.vms["new"], status, view, rt, events, None, stage)
    assert host in HOSTS and [e[1] for e in events] == ["Scheduled"] and stage.placed_fresh
    assert pool.asked() == {"h1": 1}
    assert not st.absent_from(rt, host, "new")  # placed by this process: from now on always asked


async def test_every_host_is_asked_when_a_list_cannot_prove_the_uuid_absent(world) -> None:
    rt, st, pool = world
    view = st.view(rt)
    # Not listed by this process yet (a VM reconciled before the hosts' first rounds): all asked.
    pool.hosts["h2"].domains["early"] = False
    assert await find_own_domain(rt, "early", list(HOSTS), view) == "h2"
    assert pool.asked() == {"h0": 1, "h1": 1, "h2": 1}

    await list_all(rt, st, pool)
    # A VM this process placed: its define may have come after any list (a status wiped since, a
    # failover, a migration target), so every candidate is asked whatever the lists show.
    st.placed("mine", plan.Reservation("h0", 1, 64 * MiB, "mine"))
    st.placed("mine", None)  # e.g. its status write failed; it stays one this process placed
    pool.hosts["h0"].domains["mine"] = True  # defined after h0 was listed
    assert await find_own_domain(rt, "mine", list(HOSTS), view) == "h0"
    assert pool.asked() == {"h0": 2, "h1": 2, "h2": 2}

    # A host whose connection was replaced (another URI: maybe another machine) since its list.
    pool.hosts["h1"] = FakeHost("h1")
    pool.hosts["h1"].domains["moved"] = True
    assert await find_own_domain(rt, "moved", list(HOSTS), view) == "h1"
    assert pool.asked() == {"h0": 2, "h1": 1, "h2": 2}  # only the unlisted connection was asked

    # Several hosts with the UUID: the running one wins, both asked to confirm.
    pool.hosts["h0"].domains["dup"] = False
    pool.hosts["h2"].domains["dup"] = True
    await list_all(rt, st, pool)
    assert await find_own_domain(rt, "dup", list(HOSTS), view) == "h2"
    assert pool.asked() == {"h0": 3, "h1": 1, "h2": 3}

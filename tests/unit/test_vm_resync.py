"""The VM controller's host rounds (handlers.vm_hosts.resync_host) and its placement index (VmState),
with a fake libvirt connection: an event refreshes only the VM it names, from one bulk call; the
periodic full sweep still refreshes everything; placement decisions count before status lands."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from libvirt_operator.core.api.vm import VirtualMachineSpec
from libvirt_operator.core.domain import DomainObservation, PowerState
from libvirt_operator.core.settings import Settings
from libvirt_operator.handlers import vm_hosts
from libvirt_operator.handlers.vm_state import BUSY_RETRY_SECONDS, VmState
from libvirt_operator.reconcile import actions, plan
from libvirt_operator.reconcile.runtime import Runtime
from libvirt_operator.reconcile.vm_types import VmOutcome

MiB = 2**20


class FakeConn:
    """Answers list_domains only: any per-VM libvirt call in a host round is a bug."""

    def __init__(self, uids: list[str]) -> None:
        self.observed = {u: DomainObservation(PowerState.RUNNING, uuid=u) for u in uids}
        self.calls: Counter[str] = Counter()

    async def call(self, operation: str, fn: Any, timeout: float | None = None) -> Any:
        self.calls[operation] += 1
        if operation == "list_domains":
            return dict(self.observed)
        raise AssertionError(f"unexpected libvirt call {operation}")


def vm_obj(uid: str, host: str | None = "h", printable: str = "Running", **status: Any) -> dict[str, Any]:
    st = {"host": host, "domainUUID": uid, "printableStatus": printable,
          "lastStartTime": "2026-01-01T00:00:00Z", **status} if host else {}
    return {"metadata": {"uid": uid, "namespace": "ns", "name": f"vm-{uid}", "generation": 1},
            "spec": {"cpu": 1, "memory": "64Mi"}, "status": st}


@pytest.fixture
def world(monkeypatch):
    st = VmState()
    for uid, host in (("a", "h"), ("b", "h"), ("c", "h"), ("x", "other")):
        st.vms[uid] = vm_obj(uid, host)
        st.index(uid)
    refreshed: list[str] = []

    async def fake_sync(body, rt, view, *, observed=None, now=None):
        assert observed is not None  # a host round passes what the bulk call saw
        refreshed.append(body["metadata"]["uid"])
        return VmOutcome(dict(body["status"]), [], None, None)

    monkeypatch.setattr(vm_hosts, "sync_vm", fake_sync)
    rt = Runtime(settings=Settings(knowledge_base_enabled=False), pool=None, kube=None)  # type: ignore[arg-type]
    return rt, st, FakeConn(["a", "b", "c"]), refreshed


async def test_event_round_refreshes_only_the_vms_it_names_from_one_bulk_call(world) -> None:
    rt, st, conn, refreshed = world
    await vm_hosts.resync_host(rt, st, "h", conn)  # the first round is a full sweep
    assert sorted(refreshed) == ["a", "b", "c"] and conn.calls == {"list_domains": 1}

    refreshed.clear()
    wait = await vm_hosts.resync_host(rt, st, "h", conn)  # woken with nothing dirty: asks libvirt nothing
    assert refreshed == [] and conn.calls == {"list_domains": 1}
    assert vm_hosts.RESYNC_SECONDS - 1 < wait <= vm_hosts.RESYNC_SECONDS

    st.dirty["h"] = {"b", "a-domain-no-vm-accounts-for"}
    await vm_hosts.resync_host(rt, st, "h", conn)
    assert refreshed == ["b"] and conn.calls == {"list_domains": 2}
    assert not st.dirty.get("h")


async def test_due_requeues_and_the_periodic_full_sweep(world) -> None:
    rt, st, conn, refreshed = world
    await vm_hosts.resync_host(rt, st, "h", conn)
    refreshed.clear()
    st.requeue["c"] = time.monotonic() - 0.1
    st.requeue["a"] = time.monotonic() + 3
    wait = await vm_hosts.resync_host(rt, st, "h", conn)
    assert refreshed == ["c"]  # due; `a` is not yet
    assert 2 < wait <= 3  # the daemon sleeps until `a` is due

    refreshed.clear()
    st.full_synced["h"] -= vm_hosts.RESYNC_SECONDS  # the safety net: every VM of the host, one bulk call
    calls = conn.calls["list_domains"]
    await vm_hosts.resync_host(rt, st, "h", conn)
    assert sorted(refreshed) == ["a", "b", "c"] and conn.calls["list_domains"] == calls + 1


async def test_an_event_for_a_vm_a_handler_holds_stays_dirty(world) -> None:
    rt, st, conn, refreshed = world
    await vm_hosts.resync_host(rt, st, "h", conn)
    refreshed.clear()
    async with st.lock("a"):
        st.dirty["h"] = {"a"}
        wait = await vm_hosts.resync_host(rt, st, "h", conn)
        assert refreshed == [] and st.dirty["h"] == {"a"} and wait == BUSY_RETRY_SECONDS
    await vm_hosts.resync_host(rt, st, "h", conn)
    assert refreshed == ["a"] and not st.dirty.get("h")


async def test_orphan_check_runs_with_the_full_sweep(world) -> None:
    rt, st, conn, _ = world
    await vm_hosts.resync_host(rt, st, "h", conn)  # every domain is accounted for: no host patch
    checked = st.orphan_checked["h"]
    assert st.orphan_candidates["h"] == set()
    await vm_hosts.resync_host(rt, st, "h", conn)
    assert st.orphan_checked["h"] == checked and conn.calls == {"list_domains": 1}
    st.full_synced["h"] -= vm_hosts.RESYNC_SECONDS
    await vm_hosts.resync_host(rt, st, "h", conn)
    assert st.orphan_checked["h"] > checked and conn.calls == {"list_domains": 2}  # one bulk call for both


# ---------------------------------------------------------------------------- placement index

def host_obj(name: str, cpus: int) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"zone": "z"}}, "spec": {"uri": "test:///default", "cpuAllocationRatio": 1.0},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                       "capacity": {"cpus": cpus, "memory": "64Gi"}, "allocated": {"cpus": 0, "memory": "0"}}}


def test_placement_index_counts_decisions_before_status_and_drops_them_after() -> None:
    st = VmState()
    st.vms["p"] = vm_obj("p", host=None)
    st.index("p")
    st.placed("p", plan.Reservation("h", 2, 64 * MiB, "p"))
    assert [r.uid for r in st.reserved(["h"], "other")] == ["p"]
    assert st.reserved(["h"], "p") == []      # never its own
    assert st.reserved(["elsewhere"], "x") == []

    st.vms["p"]["status"] = {"host": "h", "printableStatus": "Starting"}  # the status patch landed
    st.index("p")
    assert st.reserved(["h"], "x") == [plan.Reservation("h", 1, 64 * MiB, "p", None)]  # from the object now
    assert st.on_host["h"] == {"p"}
    st.vms["p"]["status"] = {}  # an older watch event lands after our status write
    st.index("p")
    assert [(r.uid, r.cpus) for r in st.reserved(["h"], "x")] == [("p", 2)]  # the decision still counts

    st.vms["p"]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    st.index("p")
    assert st.reserved(["h"], "x") == []
    st.forget("p")
    assert not st.on_host["h"] and not st.pending and not st.reserved(["h"], "x")

    st.placed("q", plan.Reservation("h", 1, 64 * MiB, "q"))  # not in the cache yet: still counted
    assert [r.uid for r in st.reserved(["h"], "x")] == ["q"]


def test_a_burst_of_placements_spreads_within_capacity() -> None:
    st = VmState()
    st.hosts.update({"a": host_obj("a", 10), "b": host_obj("b", 10)})
    view = st.view()
    chosen: Counter[str | None] = Counter()
    for i in range(21):  # none of them has a status yet
        uid = f"vm{i}"
        st.vms[uid] = vm_obj(uid, host=None)
        st.index(uid)
        spec = VirtualMachineSpec.model_validate({"cpu": 1, "memory": "64Mi", "hostSelector": {"matchLabels": {"zone": "z"}}})
        hosts = [plan.HostView.from_object(h) for h in view.hosts.values()]
        p = plan.choose_host(spec, hosts, view.reservations_for(plan.capacity_hosts(spec, hosts), uid))
        chosen[p.host] += 1
        if p.host:
            view.placed(uid, plan.placement_reservation(spec, p.host, uid))
    assert chosen == {"a": 10, "b": 10, None: 1}



async def test_a_host_round_hands_back_an_action_request_it_cannot_execute(world) -> None:
    """Regression (CI, stop 19): the watch queued the VM for its action request, the requeue loop found
    the host round holding the VM and backed off, and the round's healthy outcome then dropped the key:
    the stop request waited forever. A host round never executes requests, so it must hand them back."""
    rt, st, conn, refreshed = world
    request = '{"action": "stop", "id": "r1"}'
    st.vms["a"]["metadata"]["annotations"] = {actions.ACTION_REQUEST_ANNOTATION: request}
    st.retry.schedule("a", BUSY_RETRY_SECONDS)  # what the work queue does when the lock is taken
    await vm_hosts.resync_host(rt, st, "h", conn)
    assert "a" in refreshed and "a" in st.retry
    assert st.retry.pop_due() == ["a"]  # due now: the full reconcile runs at once

    # Executed (status.lastAction final for that id), and a new spec queued meanwhile: a healthy round
    # leaves the key where it is. Only the VM's own work item (the full reconcile) takes a key out of
    # the queue: a round that did would lose the spec change.
    st.vms["a"]["status"]["lastAction"] = {"id": "r1", "phase": "Succeeded"}
    st.retry.add("a")
    st.full_synced["h"] -= vm_hosts.RESYNC_SECONDS
    await vm_hosts.resync_host(rt, st, "h", conn)
    assert st.retry.pop_due() == ["a"]

"""The VM controller's host rounds (handlers.vm_hosts.resync_host) and its placement index (VmState),
with a fake libvirt connection: a round is a trigger (it queues keys with what its one bulk call saw,
and writes nothing); an event queues only the VM it names; the sweeps still cover everything; a run
trusts a sighting only if nothing acted on the VM since; placement decisions count before status lands."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest

from libvirt_operator.core.api.vm import VirtualMachineSpec
from libvirt_operator.core.domain import DomainObservation, PowerState
from libvirt_operator.core.errors import AppError, ErrorCode
from libvirt_operator.core.settings import Settings
from libvirt_operator.handlers import vm_hosts
from libvirt_operator.handlers.vm_state import BUSY_RETRY_SECONDS, HostSighting, VmState
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
def world():
    st = VmState()
    for uid, host in (("a", "h"), ("b", "h"), ("c", "h"), ("x", "other")):
        st.vms[uid] = vm_obj(uid, host)
        st.index(uid)
    rt = Runtime(settings=Settings(knowledge_base_enabled=False), pool=None, kube=None)  # type: ignore[arg-type]
    return rt, st, FakeConn(["a", "b", "c"])


def queued(st: VmState) -> list[str]:
    """The keys a round handed to the work queue (due now), each with the round's sighting."""
    keys = sorted(st.retry.pop_due())
    assert all(st.sightings[k].host == "h" for k in keys)
    return keys


async def test_a_round_queues_only_the_vms_its_events_name_from_one_bulk_call(world) -> None:
    rt, st, conn = world
    await vm_hosts.resync_host(rt, st, "h", conn)  # the first round is a full sweep
    assert queued(st) == ["a", "b", "c"] and conn.calls == {"list_domains": 1}
    assert st.sightings["a"].domain == DomainObservation(PowerState.RUNNING, uuid="a")

    wait = await vm_hosts.resync_host(rt, st, "h", conn)  # woken with nothing dirty: asks libvirt nothing
    assert queued(st) == [] and conn.calls == {"list_domains": 1}
    assert vm_hosts.RESYNC_SECONDS - 1 < wait <= vm_hosts.RESYNC_SECONDS

    st.dirty["h"] = {"b", "a-domain-no-vm-accounts-for"}
    await vm_hosts.resync_host(rt, st, "h", conn)
    assert queued(st) == ["b"] and conn.calls == {"list_domains": 2}
    assert not st.dirty.get("h")


async def test_due_requeues_and_the_sweeps(world) -> None:
    rt, st, conn = world
    await vm_hosts.resync_host(rt, st, "h", conn)
    queued(st)
    st.requeue["c"] = time.monotonic() - 0.1
    st.requeue["a"] = time.monotonic() + 3
    wait = await vm_hosts.resync_host(rt, st, "h", conn)
    assert queued(st) == ["c"] and "c" not in st.requeue  # due (its run decides anew); `a` is not yet
    assert 2 < wait <= 3  # the daemon sleeps until `a` is due

    # The 10 s sweep (one bulk call) queues the VMs whose domain changed since their last sighting…
    conn.observed["b"] = DomainObservation(PowerState.SHUTOFF, uuid="b")
    st.full_synced["h"] -= vm_hosts.RESYNC_SECONDS
    calls = conn.calls["list_domains"]
    await vm_hosts.resync_host(rt, st, "h", conn)
    assert queued(st) == ["b"] and conn.calls["list_domains"] == calls + 1
    assert st.requeue["a"] > time.monotonic()  # a deadline not due stays
    # … and, as the safety net, every VM of the host now and then.
    st.full_synced["h"] -= vm_hosts.RESYNC_SECONDS
    st.swept_all["h"] -= vm_hosts.EVERYTHING_SECONDS
    await vm_hosts.resync_host(rt, st, "h", conn)
    assert queued(st) == ["a", "b", "c"]


async def test_a_round_never_postpones_a_queued_key_and_writes_no_status(world) -> None:
    """A round is only a trigger: a key its work item scheduled for later becomes due now, a key already
    due stays due, and no VM status is written by the round (rt.kube is None: a write would fail)."""
    rt, st, conn = world
    st.retry.schedule("a", 30)
    st.retry.add("b")
    await vm_hosts.resync_host(rt, st, "h", conn)
    assert queued(st) == ["a", "b", "c"]


async def test_an_event_for_a_vm_someone_holds_waits_for_them(world) -> None:
    """What the round sees while a run (or a migration) holds the VM may predate its actions: the VM is
    looked at again once they let go, not handed a sighting its run would have to discard."""
    rt, st, conn = world
    await vm_hosts.resync_host(rt, st, "h", conn)
    queued(st)
    async with st.lock("a"):
        st.dirty["h"] = {"a"}
        wait = await vm_hosts.resync_host(rt, st, "h", conn)
        assert queued(st) == [] and st.dirty["h"] == {"a"} and wait == BUSY_RETRY_SECONDS
    await vm_hosts.resync_host(rt, st, "h", conn)
    assert queued(st) == ["a"] and not st.dirty.get("h")
    assert st.fresh("a", st.vms["a"] | {"status": st.vms["a"]["status"] | {"observedGeneration": 1}},
                    st.sightings["a"]) is not None


async def test_a_host_that_cannot_be_listed_queues_its_vms_with_that_error(world) -> None:
    rt, st, _ = world
    st.vms["c"]["status"]["printableStatus"] = "Unknown"  # already reported: not queued again
    err = AppError(ErrorCode.HOST_UNREACHABLE, "the host does not answer")
    vm_hosts._report_host_lost(st, "h", err)
    assert queued(st) == ["a", "b"] and st.sightings["a"].error is err and st.sightings["a"].domain is None


def test_a_run_uses_a_sighting_only_when_nothing_acted_on_the_vm_since() -> None:
    st = VmState()
    vm = vm_obj("a", "h", observedGeneration=1)
    seen = DomainObservation(PowerState.RUNNING, uuid="a")
    taken = time.monotonic()
    sighting = HostSighting("h", taken, domain=seen)
    assert st.fresh("a", vm, sighting) is sighting
    assert st.fresh("a", vm, None) is None
    assert st.fresh("a", vm, HostSighting("elsewhere", taken, domain=seen)) is None  # it moved meanwhile

    async def hold() -> None:  # a migration, a snapshot, another run: whoever held the VM's lock
        async with st.lock("a"):
            pass
    asyncio.run(hold())
    assert st.fresh("a", vm, sighting) is None  # taken before that holder let go: may predate its actions
    later = HostSighting("h", time.monotonic(), domain=seen)
    assert st.fresh("a", vm, later) is later

    assert st.fresh("a", vm_obj("a", "h", observedGeneration=0), later) is None  # a new spec: the full path
    request = vm_obj("a", "h", observedGeneration=1)
    request["metadata"]["annotations"] = {actions.ACTION_REQUEST_ANNOTATION: '{"action": "stop", "id": "r1"}'}
    assert st.fresh("a", request, later) is None  # only the full path executes a request
    st.parked["a"] = ErrorCode.ISO_NOT_FOUND
    assert st.fresh("a", vm, later) is None


async def test_orphan_check_runs_with_the_full_sweep(world) -> None:
    rt, st, conn = world
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


async def test_a_vm_deleted_while_the_host_is_listed_is_left_to_its_teardown(world) -> None:
    """The bulk call takes seconds on a busy host (4-7 s seen while 100 VMs were deleted at once);
    meanwhile a VM's deletion arrives, or its teardown ends and it leaves the cache. The round used
    to crash on it (KeyError: the rest of its VMs lost that round and the events it had taken); now
    it queues the others and nothing of the gone VM is kept."""
    rt, st, _ = world

    class DeletedDuringTheCall(FakeConn):
        async def call(self, operation: str, fn: Any, timeout: float | None = None) -> Any:
            seen = await super().call(operation, fn, timeout)
            st.forget("b")  # its teardown ended: the watch's DELETED
            st.vms["c"] = {**st.vms["c"], "metadata": {**st.vms["c"]["metadata"],
                                                       "deletionTimestamp": "2026-01-01T00:00:00Z"}}
            return seen

    await vm_hosts.resync_host(rt, st, "h", FakeConn(["a", "b", "c"]))  # the first round: a full sweep
    queued(st)
    st.dirty["h"] = {"a", "b", "c"}  # lifecycle events of the three
    await vm_hosts.resync_host(rt, st, "h", DeletedDuringTheCall(["a", "b", "c"]))
    assert queued(st) == ["a"]
    assert "b" not in st.last_sighted and "b" not in st.sightings

"""Pure VM planning: placement, run strategies, crash-loop backoff, redefinition, printable status."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from libvirt_operator.core.api.vm import StartFailure, VirtualMachineSpec
from libvirt_operator.core.domain import ABSENT, DomainObservation, PowerState, StopCause
from libvirt_operator.core.errors import AppError, ErrorCode
from libvirt_operator.reconcile import plan
from libvirt_operator.reconcile.plan import Action, HostView, PowerStatus, Reservation

NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
GiB = 2**30


def ago(seconds: float) -> dt.datetime:
    return NOW - dt.timedelta(seconds=seconds)


def spec(**kw) -> VirtualMachineSpec:
    return VirtualMachineSpec.model_validate(kw)


def host(name: str, cpus: int = 8, mem_gib: int = 16, labels=None, ready=True, alloc_cpus=0, alloc_gib=0,
         **kw) -> HostView:
    kw.setdefault("cpu_allocation_ratio", 1.0)  # 1:1 unless a test is about overcommit
    return HostView(name=name, labels=labels or {}, ready=ready, cpus=cpus, memory_bytes=mem_gib * GiB,
                    allocated_cpus=alloc_cpus, allocated_memory_bytes=alloc_gib * GiB, **kw)


RUNNING = DomainObservation(PowerState.RUNNING)
OFF_NEW = DomainObservation(PowerState.SHUTOFF)                      # defined, never ran
OFF_CLEAN = DomainObservation(PowerState.SHUTOFF, StopCause.CLEAN)
OFF_DESTROYED = DomainObservation(PowerState.SHUTOFF, StopCause.DESTROYED)
OFF_CRASHED = DomainObservation(PowerState.SHUTOFF, StopCause.FAILURE)
PAUSED = DomainObservation(PowerState.PAUSED)


# ---------------------------------------------------------------------------- placement

def test_host_view_from_object_parses_status():
    obj = {"metadata": {"name": "h1", "labels": {"zone": "a"}},
           "spec": {"uri": "test:///default", "defaultPool": "images"},
           "status": {"conditions": [{"type": "Ready", "status": "True"}], "capacity": {"cpus": 4, "memory": "8Gi"},
                      "allocated": {"cpus": 1, "memory": "1Gi"}, "domainTypes": ["kvm", "qemu"],
                      "lastProbeTime": "2026-01-01T11:59:00Z"}}
    hv = HostView.from_object(obj)
    assert (hv.name, hv.ready, hv.cpus, hv.memory_bytes, hv.allocated_cpus, hv.allocated_memory_bytes) == \
        ("h1", True, 4, 8 * GiB, 1, GiB)
    assert hv.labels == {"zone": "a"} and hv.domain_types == ("kvm", "qemu") and hv.default_pool == "images"
    assert hv.last_probe_time == ago(60)
    assert not HostView.from_object({"metadata": {"name": "x"}}).ready


def test_selector_picks_matching_host_with_most_free_memory():
    hosts = [host("a", labels={"zone": "x"}, mem_gib=8), host("b", labels={"zone": "x"}, mem_gib=32),
             host("c", labels={"zone": "y"}, mem_gib=256)]
    p = plan.choose_host(spec(hostSelector={"matchLabels": {"zone": "x"}}), hosts)
    assert p.host == "b" and p.error is None


def test_no_selector_considers_every_ready_host_and_ties_break_by_name():
    p = plan.choose_host(spec(), [host("zz"), host("aa"), host("down", mem_gib=999, ready=False)])
    assert p.host == "aa"


def test_capacity_counts_allocated_and_reservations():
    hosts = [host("a", cpus=4, mem_gib=4, alloc_cpus=2, alloc_gib=2), host("b", cpus=4, mem_gib=4)]
    vm = spec(cpu=2, memory="2Gi")
    assert plan.choose_host(vm, hosts).host == "b"  # b has more free memory
    # b already promised 3 GiB to a placed-but-not-running VM: only a fits now.
    reserved = [Reservation("b", 1, 3 * GiB)]
    assert plan.choose_host(vm, hosts, reserved).host == "a"
    # both full → INSUFFICIENT_RESOURCES with a helpful message
    p = plan.choose_host(spec(cpu=4, memory="2Gi"), hosts, reserved)
    assert p.host is None and p.error.code is ErrorCode.INSUFFICIENT_RESOURCES
    assert "4 CPUs" in p.error.message


def test_running_vm_counts_until_the_host_probe_has_seen_it():
    h = host("a", cpus=4, mem_gib=4, last_probe_time=ago(10))
    fresh = Reservation("a", 2, 3 * GiB, started=ago(5))     # started after the probe: not in allocated
    seen = Reservation("a", 2, 3 * GiB, started=ago(60))     # the probe counted it in allocated
    assert plan.free_resources(h, [fresh]) == (2, GiB)
    assert plan.free_resources(h, [seen]) == (4, 4 * GiB)


def test_reservations_from_vm_objects():
    def vm(uid, host_, printable=None, strategy="Always", deleting=False, started=None):
        meta = {"uid": uid, **({"deletionTimestamp": "x"} if deleting else {})}
        st = {"host": host_, **({"printableStatus": printable} if printable else {}),
              **({"lastStartTime": started} if started else {})}
        return {"metadata": meta, "spec": {"cpu": 2, "memory": "1Gi", "runStrategy": strategy}, "status": st}
    vms = [vm("1", "a", "Provisioning"), vm("2", None), vm("3", "a", strategy="Halted"), vm("4", "a", deleting=True),
           vm("5", "a", "Stopped", strategy="Once"), vm("6", "a", "Running", started="2026-01-01T11:59:55Z"),
           vm("me", "a")]
    res = plan.reservations(vms, exclude_uid="me")
    assert [(r.uid, r.cpus, r.memory_bytes) for r in res] == [("1", 2, GiB), ("6", 2, GiB)]
    assert res[0].started is None and res[1].started == ago(5)


def test_reservation_of_one_vm_object_and_of_a_placement_decision():
    placed = {"metadata": {"uid": "1"}, "spec": {"cpu": 3, "memory": "1Gi"},
              "status": {"host": "a", "printableStatus": "Starting"}}
    assert plan.reservation_of(placed) == Reservation("a", 3, GiB, "1", None)
    assert plan.reservation_of({"metadata": {"uid": "2"}, "spec": {}, "status": {}}) is None
    assert plan.placement_reservation(spec(cpu=2, memory="1Gi"), "b", "u") == Reservation("b", 2, GiB, "u", None)
    assert plan.placement_reservation(spec(runStrategy="Halted"), "b", "u") is None  # will not run


def test_host_ref_placement_reads_no_reservations_and_selectors_only_candidate_hosts():
    hosts = [host("a", labels={"zone": "x"}), host("b", labels={"zone": "x"}, ready=False),
             host("c", labels={"zone": "y"}), host("d", labels={"zone": "x"}, deleting=True)]
    assert plan.capacity_hosts(spec(hostRef="a"), hosts) == []
    assert plan.capacity_hosts(spec(hostSelector={"matchLabels": {"zone": "x"}}), hosts) == ["a"]
    assert plan.capacity_hosts(spec(), hosts) == ["a", "c"]


def test_choose_host_counts_each_hosts_own_reservations():
    hosts = [host(f"h{i:02d}", cpus=10_000, mem_gib=10_000) for i in range(20)]
    reserved = [Reservation(f"h{i % 20:02d}", 1, GiB, str(i)) for i in range(20_000) if i != 7]
    assert plan.choose_host(spec(), hosts, reserved).host == "h07"  # one reservation fewer than the rest


def test_no_matching_ready_host_is_no_schedulable_host():
    p = plan.choose_host(spec(hostSelector={"matchLabels": {"gpu": "yes"}}),
                         [host("a"), host("b", labels={"gpu": "yes"}, ready=False)])
    assert p.host is None and p.error.code is ErrorCode.NO_SCHEDULABLE_HOST
    assert "gpu=yes" in p.error.message and p.error.retryable
    assert plan.choose_host(spec(), []).error.code is ErrorCode.NO_SCHEDULABLE_HOST


def test_deleting_host_is_not_a_candidate():
    assert plan.choose_host(spec(), [host("a", deleting=True)]).error.code is ErrorCode.NO_SCHEDULABLE_HOST


def test_host_ref_pins_without_capacity_check_but_needs_existence_and_readiness():
    hosts = [host("a", cpus=1, mem_gib=1), host("b", ready=False)]
    assert plan.choose_host(spec(hostRef="a", cpu=8, memory="64Gi"), hosts).host == "a"
    assert plan.choose_host(spec(hostRef="b"), hosts).error.code is ErrorCode.NO_SCHEDULABLE_HOST
    missing = plan.choose_host(spec(hostRef="gone"), hosts)
    assert missing.error.code is ErrorCode.HOST_NOT_FOUND


# ---------------------------------------------------------------------------- tenancy

def tenant_host(name: str, **spec_fields) -> HostView:
    """A Ready host built from a LibvirtHost object, so the spec fields are parsed as the API sends them."""
    obj = {"metadata": {"name": name}, "spec": {"uri": "test:///default", **spec_fields},
           "status": {"conditions": [{"type": "Ready", "status": "True"}], "capacity": {"cpus": 8, "memory": "16Gi"},
                      "allocated": {"cpus": 0, "memory": "0"}}}
    return HostView.from_object(obj)


def test_hosts_without_tenancy_fields_admit_every_namespace_and_resource():
    h = tenant_host("open")
    vm = spec(hostRef="open", disks=[{"name": "d", "volume": {"size": "1Gi", "pool": "fast"}}],
              interfaces=[{"name": "n", "type": "network", "source": "lab"},
                          {"name": "b", "type": "bridge", "source": "br0"}])
    assert not h.restricts_namespaces
    assert plan.host_denial(vm, h, "anyone", None) is None
    assert plan.choose_host(vm, [h], namespace="anyone").host == "open"


def test_allowed_namespaces_and_selector_admit_by_name_or_labels():
    h = tenant_host("h", allowedNamespaces=["team-a"],
                    namespaceSelector={"matchLabels": {"tenant": "blue"},
                                       "matchExpressions": [{"key": "tier", "operator": "In", "values": ["prod", "dev"]},
                                                            {"key": "frozen", "operator": "DoesNotExist"}]})
    assert plan.admits_namespace(h, "team-a", None)  # listed: labels not needed
    assert plan.admits_namespace(h, "team-b", {"tenant": "blue", "tier": "dev"})
    assert not plan.admits_namespace(h, "team-b", {"tenant": "blue", "tier": "qa"})
    assert not plan.admits_namespace(h, "team-b", {"tenant": "blue", "tier": "dev", "frozen": "yes"})
    assert not plan.admits_namespace(h, "team-b", None)  # unknown labels match no selector
    assert plan.needs_namespace_labels([h], "team-b") and not plan.needs_namespace_labels([h], "team-a")
    assert not plan.needs_namespace_labels([tenant_host("open")], "team-b")
    # an empty list admits no namespace by name; an empty selector admits every namespace
    assert not plan.admits_namespace(tenant_host("closed", allowedNamespaces=[]), "team-a", {})
    assert plan.admits_namespace(tenant_host("all", allowedNamespaces=[], namespaceSelector={}), "x", {})
    notin = tenant_host("n", namespaceSelector={"matchExpressions": [
        {"key": "env", "operator": "NotIn", "values": ["prod"]}, {"key": "team", "operator": "Exists"}]})
    assert plan.admits_namespace(notin, "x", {"team": "t", "env": "dev"})
    assert not plan.admits_namespace(notin, "x", {"team": "t", "env": "prod"})
    assert not plan.admits_namespace(notin, "x", {"env": "dev"})


def test_host_ref_to_a_host_that_refuses_the_namespace_is_not_scheduled_with_a_clear_reason():
    h = tenant_host("kvm-1", allowedNamespaces=["team-a"])
    p = plan.choose_host(spec(hostRef="kvm-1"), [h], namespace="team-b")
    assert p.host is None and p.error.code is ErrorCode.NAMESPACE_NOT_ALLOWED
    assert p.error.reason == "NamespaceNotAllowed" and not p.error.retryable
    assert "LibvirtHost kvm-1 does not admit namespace team-b" in p.error.message
    assert "allowedNamespaces: team-a" in p.error.message
    assert p.error.context == {"host": "kvm-1", "namespace": "team-b"}
    # tenancy is reported before readiness: the fix is the host's spec, not waiting
    down = dataclasses.replace(h, ready=False)
    assert plan.choose_host(spec(hostRef="kvm-1"), [down], namespace="team-b").error.code \
        is ErrorCode.NAMESPACE_NOT_ALLOWED
    assert plan.choose_host(spec(hostRef="kvm-1"), [h], namespace="team-a").host == "kvm-1"


def test_host_selector_skips_hosts_that_refuse_the_vm():
    big_closed = tenant_host("big", allowedNamespaces=["other"])
    small_open = dataclasses.replace(tenant_host("small"), memory_bytes=2 * GiB)
    vm = spec()
    assert plan.choose_host(vm, [big_closed, small_open], namespace="team-b").host == "small"
    p = plan.choose_host(vm, [big_closed], namespace="team-b")
    assert p.error.code is ErrorCode.NAMESPACE_NOT_ALLOWED and "none of the 1 LibvirtHost(s)" in p.error.message
    # the namespace's labels decide too
    labelled = tenant_host("sel", namespaceSelector={"matchLabels": {"tenant": "blue"}})
    assert plan.choose_host(vm, [labelled], namespace="team-b", namespace_labels={"tenant": "blue"}).host == "sel"
    assert plan.choose_host(vm, [labelled], namespace="team-b", namespace_labels={"tenant": "red"}).error.code \
        is ErrorCode.NAMESPACE_NOT_ALLOWED


def test_pools_networks_and_bridges_must_be_exposed_by_the_host():
    h = tenant_host("h", defaultPool="vms", allowedPools=["fast"], allowedNetworks=["lab"], allowedBridges=[])
    ok = spec(disks=[{"name": "a", "volume": {"size": "1Gi"}}, {"name": "b", "volume": {"size": "1Gi", "pool": "fast"}}],
              interfaces=[{"name": "u"}, {"name": "n", "type": "network", "source": "lab"}])
    assert plan.host_denial(ok, h, "ns", None) is None  # defaultPool is always allowed
    err = plan.host_denial(spec(disks=[{"name": "a", "volume": {"size": "1Gi", "pool": "slow"}}]), h, "ns", None)
    assert err.code is ErrorCode.POOL_NOT_ALLOWED and err.reason == "PoolNotAllowed"
    assert "storage pool slow" in err.message and "allowedPools: fast" in err.message
    err = plan.host_denial(spec(interfaces=[{"name": "n", "type": "network", "source": "prod"}]), h, "ns", None)
    assert err.code is ErrorCode.NETWORK_NOT_ALLOWED and "network prod" in err.message
    err = plan.host_denial(spec(interfaces=[{"name": "b", "type": "bridge", "source": "br0"}]), h, "ns", None)
    assert err.code is ErrorCode.NETWORK_NOT_ALLOWED and "allowedBridges: none" in err.message
    # placement: hostRef reports it, a selector skips the host
    slow = [{"name": "a", "volume": {"size": "1Gi", "pool": "slow"}}]
    assert plan.choose_host(spec(hostRef="h", disks=slow), [h], namespace="ns").error.code \
        is ErrorCode.POOL_NOT_ALLOWED
    assert plan.choose_host(spec(disks=slow), [h, tenant_host("open")], namespace="ns").host == "open"
    # ISOImages: namespace, then pool
    assert plan.image_denial(h, "ns", None, "vms") is None
    assert plan.image_denial(h, "ns", None, "isos").code is ErrorCode.POOL_NOT_ALLOWED
    assert plan.image_denial(tenant_host("c", allowedNamespaces=[]), "ns", None, "default").code \
        is ErrorCode.NAMESPACE_NOT_ALLOWED


@pytest.mark.parametrize("requested,types,previous,expected", [
    ("auto", ("kvm", "qemu"), None, "kvm"),
    ("auto", ("qemu",), None, "qemu"),
    ("auto", ("test",), None, "qemu"),
    ("auto", ("kvm", "qemu"), "qemu", "qemu"),  # sticky once chosen
    ("qemu", ("kvm", "qemu"), None, "qemu"),
    ("kvm", (), None, "kvm"),                   # unknown host facts: trust the user
])
def test_domain_type(requested, types, previous, expected):
    assert plan.domain_type_for(requested, types, previous) == expected


def test_kvm_on_a_host_without_kvm_is_permanent():
    with pytest.raises(AppError) as err:
        plan.domain_type_for("kvm", ("qemu",))
    assert err.value.code is ErrorCode.HYPERVISOR_UNSUPPORTED and not err.value.retryable


# ---------------------------------------------------------------------------- power

def power(strategy, observed, status=PowerStatus(), grace=60.0, now=NOW):
    return plan.plan_power(strategy, observed, status, now, grace)


BOOTED = PowerStatus(first_boot_time=ago(3600), last_start_time=ago(3600))


@pytest.mark.parametrize("strategy", ["Always", "Manual", "RerunOnFailure", "Once"])
def test_new_domain_is_started_except_halted(strategy):
    for obs in (OFF_NEW, ABSENT):
        p = power(strategy, obs)
        assert p.action is Action.START and p.printable == "Starting" and not p.ready
        assert p.desired_running is True


def test_halted_new_domain_stays_off_and_is_ready():
    p = power("Halted", OFF_NEW)
    assert p.action is Action.NONE and p.printable == "Stopped" and p.ready and p.reason == "Stopped"


@pytest.mark.parametrize("strategy", ["Always", "Manual", "RerunOnFailure", "Once"])
def test_running_is_ready(strategy):
    p = power(strategy, RUNNING, BOOTED)
    assert p.action is Action.NONE and p.ready and p.printable == "Running" and p.reason == "Running"


def test_running_domain_records_boot_times_when_adopted():
    p = power("Always", RUNNING, PowerStatus())
    assert p.status.first_boot_time == NOW and p.status.last_start_time == NOW


def test_halted_stops_gracefully_then_powers_off_after_grace():
    p = power("Halted", RUNNING, BOOTED, grace=30)
    assert p.action is Action.SHUTDOWN and p.status.stop_requested_time == NOW and p.requeue_after == 30
    assert p.printable == "Stopping" and not p.ready
    waiting = power("Halted", RUNNING, PowerStatus(ago(99), ago(99), stop_requested_time=ago(10)), grace=30)
    assert waiting.action is Action.NONE and waiting.requeue_after == pytest.approx(20)
    late = power("Halted", RUNNING, PowerStatus(ago(99), ago(99), stop_requested_time=ago(31)), grace=30)
    assert late.action is Action.DESTROY
    assert power("Halted", RUNNING, BOOTED, grace=0).action is Action.DESTROY
    assert power("Halted", PAUSED, BOOTED).action is Action.DESTROY


def test_stopped_on_purpose_forgets_the_crash_loop():
    looping = PowerStatus(ago(99), None, start_failure=StartFailure(consecutive_fail_count=2, retry_after=ago(-5)))
    assert power("Halted", OFF_CLEAN, looping).status.start_failure is None
    assert power("Always", OFF_CRASHED, looping).status.start_failure is not None


def test_halted_stop_by_the_operator_is_not_a_failure():
    p = power("Halted", OFF_DESTROYED, PowerStatus(ago(99), ago(99), stop_requested_time=ago(40)))
    assert p.action is Action.NONE and p.ready and p.status.start_failure is None
    assert p.status.stop_requested_time is None and p.status.last_start_time is None


def test_always_restarts_after_clean_shutdown_without_backoff():
    p = power("Always", OFF_CLEAN, BOOTED)
    assert p.action is Action.START and p.status.start_failure is None
    assert p.status.last_start_time is None  # the run is accounted for


def test_always_backs_off_after_a_crash():
    p = power("Always", OFF_CRASHED, PowerStatus(ago(99), ago(5)))
    assert p.action is Action.NONE and p.printable == "CrashLoopBackOff" and not p.ready
    assert p.status.start_failure.consecutive_fail_count == 1
    assert p.status.start_failure.retry_after == NOW + dt.timedelta(seconds=10)
    assert p.requeue_after == pytest.approx(10)
    # the same observation again does not count twice (lastStartTime was cleared)
    again = power("Always", OFF_CRASHED, p.status, now=NOW + dt.timedelta(seconds=3))
    assert again.status.start_failure.consecutive_fail_count == 1 and again.action is Action.NONE
    # once the backoff has passed: start
    due = power("Always", OFF_CRASHED, p.status, now=NOW + dt.timedelta(seconds=11))
    assert due.action is Action.START and due.printable == "Starting"


def test_backoff_grows_for_short_runs_and_resets_after_a_stable_run():
    short = PowerStatus(ago(999), ago(5), start_failure=StartFailure(consecutive_fail_count=3, retry_after=ago(30)))
    p = power("Always", OFF_CRASHED, short)
    assert p.status.start_failure.consecutive_fail_count == 4
    assert p.status.start_failure.retry_after == NOW + dt.timedelta(seconds=80)
    stable = dataclass_replace(short, last_start_time=ago(600))
    after_stable = power("Always", OFF_CRASHED, stable)  # not a crash loop: restart at once
    assert after_stable.status.start_failure is None and after_stable.action is Action.START
    # running long enough clears the failure record
    running = power("Always", RUNNING, dataclass_replace(short, last_start_time=ago(61)))
    assert running.status.start_failure is None
    still = power("Always", RUNNING, dataclass_replace(short, last_start_time=ago(20)))
    assert still.status.start_failure is not None and still.requeue_after == pytest.approx(40)


def dataclass_replace(obj, **kw):
    import dataclasses
    return dataclasses.replace(obj, **kw)


def test_start_backoff_caps_at_five_minutes():
    assert [plan.start_backoff(n) for n in (1, 2, 3, 4, 5, 6, 10)] == [10, 20, 40, 80, 160, 300, 300]


def test_record_start_failure():
    f = plan.record_start_failure(None, NOW)
    assert f.consecutive_fail_count == 1 and f.retry_after == NOW + dt.timedelta(seconds=10)
    f2 = plan.record_start_failure(f, NOW)
    assert f2.consecutive_fail_count == 2 and f2.retry_after == NOW + dt.timedelta(seconds=20)
    assert plan.record_start_failure(f2, NOW, last_start=ago(120)).consecutive_fail_count == 1


def test_rerun_on_failure():
    assert power("RerunOnFailure", OFF_CLEAN, BOOTED).action is Action.NONE
    clean = power("RerunOnFailure", OFF_CLEAN, BOOTED)
    assert clean.ready and clean.printable == "Stopped"
    crashed = power("RerunOnFailure", OFF_CRASHED, PowerStatus(ago(999), ago(600)))
    assert crashed.action is Action.START and crashed.status.start_failure is None  # after a stable run


def test_rerun_on_failure_after_crash_waits_for_backoff_then_starts():
    p = power("RerunOnFailure", OFF_DESTROYED, PowerStatus(ago(999), ago(5)))
    assert p.action is Action.NONE and p.printable == "CrashLoopBackOff"
    later = power("RerunOnFailure", OFF_DESTROYED, p.status, now=NOW + dt.timedelta(seconds=10))
    assert later.action is Action.START


def test_once_never_restarts():
    for obs in (OFF_CLEAN, OFF_CRASHED, OFF_DESTROYED):
        p = power("Once", obs, BOOTED)
        assert p.action is Action.NONE and p.printable == "Stopped" and p.ready
        assert p.desired_running is False


def test_manual_starts_once_then_leaves_power_alone():
    assert power("Manual", OFF_NEW).action is Action.START
    for obs, printable in ((OFF_CLEAN, "Stopped"), (OFF_CRASHED, "Stopped"), (RUNNING, "Running"),
                           (PAUSED, "Paused")):
        p = power("Manual", obs, BOOTED)
        assert p.action is Action.NONE and p.desired_running is None and p.printable == printable and p.ready


def test_paused_and_shutting_down_under_always():
    p = power("Always", PAUSED, BOOTED)
    assert p.action is Action.NONE and p.printable == "Paused" and not p.ready
    s = power("Always", DomainObservation(PowerState.SHUTTING_DOWN), BOOTED)
    assert s.action is Action.NONE and s.printable == "Stopping" and s.requeue_after == 1.0


def test_crashed_state_is_powered_off_first():
    p = power("Always", DomainObservation(PowerState.CRASHED, StopCause.FAILURE), PowerStatus(ago(99), ago(5)))
    assert p.action is Action.DESTROY and p.status.start_failure.consecutive_fail_count == 1


def test_unknown_state_does_nothing():
    p = power("Always", DomainObservation(PowerState.UNKNOWN), BOOTED)
    assert p.action is Action.NONE and p.printable == "Unknown" and not p.ready


def test_unknown_run_strategy_is_rejected():
    with pytest.raises(ValueError):
        plan.desired_running("Sometimes", RUNNING, BOOTED)


# ---------------------------------------------------------------------------- redefine, printable

def test_redefine_decisions():
    assert plan.plan_redefine("h1", None, None, False) == plan.RedefinePlan(True, False)   # new domain
    assert plan.plan_redefine("h1", "h1", None, False) == plan.RedefinePlan(False, False)  # up to date
    assert plan.plan_redefine("h1", "h1", "h1", True) == plan.RedefinePlan(False, False)
    assert plan.plan_redefine("h2", "h1", None, False) == plan.RedefinePlan(True, False)   # off: just redefine
    assert plan.plan_redefine("h2", "h1", "h1", True) == plan.RedefinePlan(True, True)     # running: restart
    assert plan.plan_redefine("h2", "h2", "h1", True) == plan.RedefinePlan(False, True)    # defined, not booted


def test_printable_status_priorities():
    running = power("Always", RUNNING, BOOTED)
    assert plan.printable_status(power=running) == "Running"
    assert plan.printable_status(deleting=True, unschedulable=True, power=running) == "Terminating"
    assert plan.printable_status(unschedulable=True) == "ErrorUnschedulable"
    assert plan.printable_status(waiting_for_media=True, provisioning=True) == "WaitingForMedia"
    assert plan.printable_status(host_unknown=True, power=running) == "Unknown"
    assert plan.printable_status() == "Provisioning"


def test_eject_media_only_after_the_first_run_ended():
    eject = plan.eject_media_now
    assert eject("EjectAfterFirstBoot", ago(60), False, OFF_CLEAN)
    assert eject("EjectAfterFirstBoot", ago(60), False, OFF_CRASHED)
    assert not eject("EjectAfterFirstBoot", ago(60), False, RUNNING)   # the installer still reads it
    assert not eject("EjectAfterFirstBoot", None, False, OFF_NEW)       # never booted
    assert not eject("EjectAfterFirstBoot", ago(60), True, OFF_CLEAN)   # already done
    assert not eject("Keep", ago(60), False, OFF_CLEAN)


def test_allocation_ratios_let_placement_overcommit_cpus_and_default_like_openstack():
    """Defect 4: a 2-core host places a third 1-vCPU VM (default cpuAllocationRatio 4.0, OpenStack's), and
    never more than capacity × ratio; memory is not overcommitted by default."""
    obj = {"metadata": {"name": "small"}, "spec": {"uri": "test:///default"},
           "status": {"conditions": [{"type": "Ready", "status": "True"}], "capacity": {"cpus": 2, "memory": "4Gi"},
                      "allocated": {"cpus": 2, "memory": "1Gi"}}}
    hv = HostView.from_object(obj)
    assert (hv.cpu_allocation_ratio, hv.memory_allocation_ratio) == (4.0, 1.0)
    vm = spec(cpu=1, memory="512Mi")
    reserved = [Reservation("small", 1, 512 * 2**20, uid=str(i)) for i in range(5)]
    assert plan.choose_host(vm, [hv], reserved).host == "small"             # 2 + 5 + 1 = 8 = 2 × 4.0
    full = plan.choose_host(vm, [hv], reserved + [Reservation("small", 1, 0, uid="x")])
    assert full.host is None and full.error.code is ErrorCode.INSUFFICIENT_RESOURCES
    assert plan.choose_host(spec(cpu=1, memory="4Gi"), [hv]).host is None   # memory ratio 1.0
    roomy = HostView.from_object({**obj, "spec": {"uri": "test:///default", "memoryAllocationRatio": 1.5}})
    assert plan.choose_host(spec(cpu=1, memory="4Gi"), [roomy]).host == "small"


def test_vms_that_cannot_run_hold_no_reservation_and_free_is_never_shown_negative():
    """Defect 4: pinned VMs that never started (waiting for media, crash-looping, failed provisioning)
    do not eat the host's capacity forever; a message never shows negative free capacity."""
    def vm(uid, printable, **status):
        return {"metadata": {"uid": uid}, "spec": {"cpu": 40, "memory": "1Gi", "hostRef": "a"},
                "status": {"host": "a", "printableStatus": printable, **status}}
    waiting = [vm("1", "WaitingForMedia"), vm("2", "CrashLoopBackOff"),
               vm("3", "Provisioning", error={"code": "STORAGE_POOL_NOT_FOUND"}), vm("4", "ErrorUnschedulable")]
    assert plan.reservations(waiting) == []
    assert [r.uid for r in plan.reservations([vm("5", "Provisioning"), vm("6", "Starting")])] == ["5", "6"]
    over = plan.choose_host(spec(cpu=1, hostSelector={"matchLabels": {}}), [host("a", cpus=2)],
                            plan.reservations([vm("5", "Provisioning")]))
    assert over.error is not None and "most free: 0 CPUs" in over.error.message

"""Cordon and fence on test-driver hosts with the session operator: what a VM does when its host is
declared out of service and there is nowhere to go (it stays, its domain untouched), when a host appears
(it moves, and the reachable old host's copy is removed first), and what a cordon changes (nothing new
is placed, nothing running is touched). The disk-following and power-loss paths on real daemons:
test_host_failover_real.py."""

from __future__ import annotations

import time
import uuid

from tests.integration.test_vm_lifecycle import (
    domains, event_reasons, make_host, make_vm, status, uniq, wait_printable,
)

VM, HOST = "virtualmachines", "libvirthosts"
RUNNING = 1


def test_a_vm_with_nowhere_to_go_stays_with_its_domain_then_moves_when_a_host_appears(
        kube, operator, namespace, test_host_factory) -> None:
    zone = uuid.uuid4().hex[:6]
    a = make_host(kube, test_host_factory("fence-a"), uniq("fence-a"), {"zone": zone})
    vm = make_vm(kube, namespace, "web", hostSelector={"matchLabels": {"zone": zone}}, hostFailurePolicy="Recreate")
    uid = vm["metadata"]["uid"]
    wait_printable(kube, namespace, "web", "Running")

    kube.patch(HOST, a, {"spec": {"outOfService": True}})
    st = kube.wait_for(lambda: (s := status(kube, namespace, "web")).get("error", {}).get("code")
                       == "NO_SCHEDULABLE_HOST" and s, timeout=30, what="web: no host to go to")
    # Nowhere to go: it stays where it was, and its domain is not touched.
    assert st["host"] == a and not st.get("staleDomainHosts")
    assert st["error"]["message"].endswith(f"cordoned or out of service: {a}")
    assert [s for u, s in domains(operator, a).values() if u == uid] == [RUNNING]

    b = make_host(kube, test_host_factory("fence-b"), uniq("fence-b"), {"zone": zone})
    st = kube.wait_for(lambda: (s := status(kube, namespace, "web")).get("host") == b
                       and s.get("printableStatus") == "Running" and s, timeout=30, what="web Running on b")
    assert not st.get("staleDomainHosts")  # a answered: its copy went first, nothing is left to remove
    assert uid not in {u for u, _ in domains(operator, a).values()}
    assert "HostOutOfService" in event_reasons(kube, namespace, "web")


def test_a_cordoned_host_takes_nothing_new_and_keeps_what_runs(kube, operator, namespace, test_host_factory) -> None:
    zone = uuid.uuid4().hex[:6]
    a = make_host(kube, test_host_factory("cordon-a"), uniq("cordon-a"), {"zone": zone})
    vm = make_vm(kube, namespace, "old", hostSelector={"matchLabels": {"zone": zone}})
    wait_printable(kube, namespace, "old", "Running")
    kube.patch(HOST, a, {"spec": {"unschedulable": True}})
    make_vm(kube, namespace, "new", hostSelector={"matchLabels": {"zone": zone}})
    st = kube.wait_for(lambda: (s := status(kube, namespace, "new")).get("error") and s, timeout=30,
                       what="new: waiting for a host")
    assert not st.get("host") and st["error"]["code"] == "NO_SCHEDULABLE_HOST"
    assert f"cordoned or out of service: {a}" in st["error"]["message"]
    time.sleep(1)
    assert status(kube, namespace, "old")["printableStatus"] == "Running"
    assert [s for u, s in domains(operator, a).values() if u == vm["metadata"]["uid"]] == [RUNNING]
    kube.patch(HOST, a, {"spec": {"unschedulable": False}})  # uncordoned: the waiting VM goes there
    wait_printable(kube, namespace, "new", "Running")
    assert status(kube, namespace, "new")["host"] == a

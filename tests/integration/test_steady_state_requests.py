"""What an idle fleet costs the apiserver: the operator's requests, counted by the apiserver itself.

A private control plane (nobody else talks to it) and the real operator process; a test-driver host
with N VMs, all Running. Then, over a quiet window, the apiserver's own request counters
(`apiserver_request_total`) must show no write to any VirtualMachine or Event (nothing changed, so
nothing is written), no GET or LIST of VirtualMachines (they are watch-fed), and host status writes
bounded by the probe interval — the same for 4 VMs as for 16, which is how an N+1 shows up."""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter

from tests.harness.kube import Kube
from tests.harness.operator_process import OperatorProcess

WINDOW = 15.0
PROBE = 5
_LINE = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$')


def request_counts(kube: Kube) -> Counter[tuple[str, str, str]]:
    """(verb, resource, subresource) → requests served so far, from the apiserver's /metrics."""
    response = kube.api.call_api(*kube.api.param_serialize("GET", "/metrics", auth_settings=["BearerToken"]))
    text = response.read().decode()
    counts: Counter[tuple[str, str, str]] = Counter()
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
        counts[(labels.get("verb", ""), labels.get("resource", ""), labels.get("subresource", ""))] += int(float(m["value"]))
    return counts


def idle_requests(kube: Kube, namespace: str, host_uri: str, vms: int) -> Counter[tuple[str, str, str]]:
    host = f"idle-{uuid.uuid4().hex[:6]}"
    kube.create("libvirthosts", {"metadata": {"name": host}, "spec": {"uri": host_uri, "probeIntervalSeconds": PROBE}})
    for i in range(vms):
        kube.create("virtualmachines", {"metadata": {"name": f"vm-{i}"}, "spec": {
            "hostRef": host, "memory": "64Mi", "runStrategy": "Always"}}, namespace)
    Kube.wait_for(lambda: all((((kube.get("virtualmachines", f"vm-{i}", namespace) or {}).get("status") or {})
                               .get("printableStatus") == "Running") for i in range(vms)),
                  timeout=120, what=f"{vms} VMs Running")
    time.sleep(PROBE + 2)  # the last status writes and Events of the start-up are out
    before = request_counts(kube)
    time.sleep(WINDOW)
    after = request_counts(kube)
    for i in range(vms):
        kube.delete("virtualmachines", f"vm-{i}", namespace)
    Kube.wait_for(lambda: not kube.custom.list_namespaced_custom_object(
        "virt.libvirt-operator.io", "v1alpha1", namespace, "virtualmachines")["items"], timeout=120, what="VMs gone")
    kube.delete("libvirthosts", host)
    return Counter({k: after[k] - before[k] for k in after if after[k] - before[k] > 0})


def test_an_idle_fleet_writes_nothing_and_costs_the_same_for_4_and_16_vms(private_cp, test_host_factory,
                                                                          tmp_path) -> None:
    kube = Kube(private_cp.kubeconfig_path)
    namespace = kube.new_namespace()
    op = OperatorProcess(private_cp.kubeconfig_path, tmp_path,
                         extra_args=("--test-driver-dir", str(test_host_factory.directory))).start()
    try:
        small = idle_requests(kube, namespace, test_host_factory("small", cpus=64, memory_mib=65536), 4)
        large = idle_requests(kube, namespace, test_host_factory("large", cpus=64, memory_mib=65536), 16)
    finally:
        op.stop()
    print(f"measured: idle {WINDOW:.0f}s with 4 VMs: {dict(small)}; with 16 VMs: {dict(large)}")
    for counts, n in ((small, 4), (large, 16)):
        mutating = {k: v for k, v in counts.items() if k[0] in ("POST", "PUT", "PATCH", "DELETE")}
        vm_writes = {k: v for k, v in mutating.items() if k[1] in ("virtualmachines", "events")}
        assert not vm_writes, f"{n} idle VMs: writes {vm_writes}\n{op.tail()}"
        vm_reads = {k: v for k, v in counts.items() if k[1] == "virtualmachines" and k[0] in ("GET", "LIST")}
        assert not vm_reads, f"{n} idle VMs were read one by one or listed: {vm_reads}"
        host_writes = sum(v for k, v in mutating.items() if k[1] == "libvirthosts")
        assert host_writes <= WINDOW / PROBE + 1, f"host status written {host_writes} times in {WINDOW}s"
    # Whatever the operator does at rest, it does not grow with the fleet.
    total = lambda c: sum(v for k, v in c.items() if k[1] != "leases")  # noqa: E731
    assert total(large) <= total(small) + 2, (dict(small), dict(large))

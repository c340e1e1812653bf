"""The metrics of the real operator (in-process, real apiserver, test:// hosts) as a Prometheus user
reads them: a host that refuses connections counts as reconcile errors, kopf's own API requests are
in rest_client_*, and a deleted host's series disappear."""

from __future__ import annotations

import socket
import uuid

from prometheus_client import REGISTRY

HOST = "libvirthosts"


def total(metric: str, **labels: str) -> float:
    """Sum of the samples of `metric` whose labels include `labels`."""
    return sum(s.value for m in REGISTRY.collect() for s in m.samples
               if s.name == metric and labels.items() <= s.labels.items())


def host_series(host: str) -> list[str]:
    return [s.name for m in REGISTRY.collect() for s in m.samples if s.labels.get("host") == host]


def test_a_refusing_host_counts_reconcile_errors_and_a_deleted_host_leaves_no_series(kube, operator, namespace,
                                                                                      test_host_factory) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead, good = f"m-dead-{uuid.uuid4().hex[:6]}", f"m-good-{uuid.uuid4().hex[:6]}"
    errors = total("controller_runtime_reconcile_errors_total", controller="libvirthost")
    error_results = total("controller_runtime_reconcile_total", controller="libvirthost", result="error")
    kube.create(HOST, {"metadata": {"name": dead},
                       "spec": {"uri": f"qemu+tcp://127.0.0.1:{port}/system", "insecure": True,
                                "probeIntervalSeconds": 5}})
    kube.create(HOST, {"metadata": {"name": good}, "spec": {"uri": test_host_factory(good)}})
    kube.wait_condition(HOST, dead, "Ready", "False", timeout=30)
    kube.wait_condition(HOST, good, "Ready", "True", timeout=30)
    # The probe that found the host refusing is a reconcile that ended in an error.
    kube.wait_for(lambda: total("controller_runtime_reconcile_errors_total", controller="libvirthost") > errors,
                  what="reconcile errors counted")
    assert total("controller_runtime_reconcile_total", controller="libvirthost", result="error") > error_results
    assert total("libvirt_operator_host_ready", host=dead) == 0
    assert total("libvirt_operator_host_ready", host=good) == 1
    assert total("rest_client_request_duration_seconds_count", verb="PATCH") > 0

    # A VM's Events are posted by kopf's client (kopf.event; ours posts only cluster-scoped Events, for
    # host Ready changes, and both hosts have settled): kopf's requests are metered too.
    events = total("rest_client_requests_total", method="POST", code="201")
    kube.create("virtualmachines", {"metadata": {"name": "evented"}, "spec": {"memory": "64Mi", "hostRef": good}},
                namespace)
    kube.wait_for(lambda: kube.events_for(namespace, "evented"), what="the VM's Events")
    kube.wait_for(lambda: total("rest_client_requests_total", method="POST", code="201") > events,
                  what="kopf's Event POSTs counted")
    kube.delete("virtualmachines", "evented", namespace)
    kube.wait_for(lambda: kube.get("virtualmachines", "evented", namespace) is None, what="VM gone")

    assert "libvirt_operator_host_ready" in host_series(good)
    kube.delete(HOST, good)
    kube.delete(HOST, dead)
    kube.wait_for(lambda: kube.get(HOST, good) is None and kube.get(HOST, dead) is None, what="hosts gone")
    kube.wait_for(lambda: not host_series(good) and not host_series(dead), timeout=15,
                  what=f"no series left for the deleted hosts: {host_series(good) + host_series(dead)}")


async def test_the_operators_own_client_is_metered(kubeconfig) -> None:
    """A Secret that does not exist: one GET answered 404 (kopf never reads Secrets)."""
    from libvirt_operator.adapters.kube import KubeClient

    client = await KubeClient.create(str(kubeconfig))
    try:
        before = total("rest_client_requests_total", method="GET", code="404")
        durations = total("rest_client_request_duration_seconds_count", verb="GET")
        assert await client.read_secret("default", f"missing-{uuid.uuid4().hex[:6]}") is None
        assert total("rest_client_requests_total", method="GET", code="404") == before + 1
        assert total("rest_client_request_duration_seconds_count", verb="GET") >= durations + 1
    finally:
        await client.close()

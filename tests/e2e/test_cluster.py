"""The harness's single-node cluster works as a cluster: a pod is scheduled, runs, resolves
`kubernetes.default.svc` through the cluster DNS, reaches the API server through the `kubernetes`
Service with its ServiceAccount token, and reaches the node's libvirtd. (The session fixture's
teardown then checks that the host is as it was: sysctls, directories, cgroups, mounts, namespaces.)"""

from __future__ import annotations

import time

import pytest
from kubernetes import client

from tests.harness.cluster import Cluster, ensure_busybox_image
from tests.harness.kube import Kube

pytestmark = pytest.mark.e2e


def test_a_pod_runs_and_reaches_dns_the_api_server_and_libvirtd(e2e_cluster: Cluster | None) -> None:
    if e2e_cluster is None:
        pytest.skip("checks the harness cluster (a user's KUBECONFIG cluster is used as it is)")
    tar, image = ensure_busybox_image()
    e2e_cluster.import_image(tar)
    kube = Kube(e2e_cluster.kubeconfig_path)
    ns = kube.new_namespace("smoke")
    kube.wait_for(lambda: kube.core.list_namespaced_service_account(ns).items, timeout=30,
                  what="the default ServiceAccount")
    script = (
        "nslookup kubernetes.default.svc.cluster.local && "
        "wget -q -O /tmp/v --no-check-certificate --header \"Authorization: Bearer "
        "$(cat /var/run/secrets/kubernetes.io/serviceaccount/token)\" https://kubernetes.default.svc/version && "
        "cat /tmp/v && echo && "
        f"echo | nc -w 3 {e2e_cluster.node_ip} 16509 && echo LIBVIRTD-REACHABLE; sleep 3600"
    )
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "smoke"},
           "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
               "name": "smoke", "image": image, "imagePullPolicy": "Never", "command": ["/bin/sh", "-c", script],
               "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "readOnlyRootFilesystem": True,
                                   "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
               "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}],
               "volumes": [{"name": "tmp", "emptyDir": {"medium": "Memory"}}]}}  # fmt: skip
    t0 = time.monotonic()
    kube.core.create_namespaced_pod(ns, pod)
    kube.wait_for(lambda: kube.core.read_namespaced_pod("smoke", ns).status.phase == "Running", timeout=60,
                  what="pod Running")
    running = time.monotonic() - t0

    def log() -> str:
        return kube.core.read_namespaced_pod_log("smoke", ns)  # via the kubelet: node InternalIP

    try:
        out = kube.wait_for(lambda: "LIBVIRTD-REACHABLE" in (text := log()) and text, timeout=30,
                            what="the pod's checks")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- pod log:\n{log()}") from None
    assert "10.234.0.1" in out  # kubernetes.default.svc from the cluster DNS
    assert '"gitVersion"' in out  # the API server, through the Service, with the pod's token
    print(f"\npod created → Running in {running:.1f} s; cluster timings {e2e_cluster.timings}")
    client.CoreV1Api(kube.api).delete_namespaced_pod("smoke", ns, grace_period_seconds=0)

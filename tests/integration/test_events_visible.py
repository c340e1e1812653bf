"""Events reach `kubectl describe` (what a user reads), for cluster-scoped LibvirtHosts too."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest


def describe(kubeconfig, *args: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    return subprocess.run([kubectl, "describe", *args], env=env, check=True, capture_output=True, text=True,
                          timeout=30).stdout


def test_libvirthost_events_show_in_kubectl_describe(kube, kubeconfig, operator) -> None:
    """Defect 7: the Ready transition's Event of a (cluster-scoped) LibvirtHost is listed by
    `kubectl describe lvh`, which searches for Events whose involvedObject has no namespace."""
    name = f"ev-{uuid.uuid4().hex[:6]}"
    kube.create("libvirthosts", {"metadata": {"name": name}, "spec": {"uri": "test:///default"}})
    try:
        kube.wait_condition("libvirthosts", name, "Ready", "True", timeout=30)
        out = kube.wait_for(lambda: (text := describe(kubeconfig, "libvirthost", name))
                            and "libvirt-operator" in text.split("Events:")[-1] and text,
                            timeout=15, what="an Event in kubectl describe")
        events = out.split("Events:")[-1]
        assert "Normal" in events, events
    finally:
        kube.delete("libvirthosts", name)


def test_an_image_waiting_for_a_host_posts_no_warning(kube, operator, namespace) -> None:
    """Defect 7: an ISOImage applied before any host it targets waits quietly (Normal Events only)."""
    kube.create("isoimages", {"metadata": {"name": "early"}, "spec": {
        "source": {"url": "http://127.0.0.1:9/never.iso"}, "checksum": "sha256:" + "ab" * 32,
        "targets": {"hostSelector": {"matchLabels": {"site": f"none-{uuid.uuid4().hex[:6]}"}}}}}, namespace)

    def reasons() -> list[tuple[str, str]]:
        return [(e.type, e.reason) for e in kube.events_for(namespace, "early")]

    kube.wait_for(lambda: (obj := kube.get("isoimages", "early", namespace)) and any(
        c["type"] == "Ready" and c["status"] == "False" and c.get("reason") not in ("Queued", "Importing")
        for c in (obj.get("status") or {}).get("conditions") or []), timeout=30, what="the image waiting for a host")
    kube.wait_for(reasons, timeout=10, what="an Event")
    assert [r for r in reasons() if r[0] == "Warning"] == [], reasons()
    kube.delete("isoimages", "early", namespace)

"""Blocked ISOImage deletions cost the operator no worker.

An ISOImage a VM still uses cannot be deleted (ISO_IN_USE). kopf would sleep out a TemporaryError's
delay inside the object's worker, so more blocked deletions than kopf has workers would stop new
objects. The ISO work queue records DeletionBlocked and moves on; the operator's own finalizer
(virt.libvirt-operator.io/teardown, the only one: kopf keeps none on ISOImages) keeps the image, and
the queue runs its teardown again when a VM that referenced it goes.

Real parts: the session's apiserver and in-process operator, libvirt test:// hosts. The images are
never imported (their source is a refused private address): nothing to delete on a host, only the
deletion path is exercised.
"""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.harness.kube import GROUP, VERSION, Kube, condition

VM = "virtualmachines"
ISO = "isoimages"
HOST = "libvirthosts"
TEARDOWN = f"{GROUP}/teardown"
KOPF_FINALIZER = f"{GROUP}/finalizer"
BLOCKED = int(os.environ.get("LIBVIRT_OPERATOR_BLOCKED_ISO_DELETIONS", "250"))  # > kopf's worker_limit (200)
VALID_READY_WITHIN = 10.0


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _list(kube: Kube, namespace: str, plural: str) -> list[dict[str, Any]]:
    return kube.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]


def _iso(name: str, host: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ISOImage", "metadata": {"name": name},
            "spec": {"source": {"url": f"http://10.255.0.1/{name}.iso"}, "checksum": "sha256:" + "0" * 64,
                     "targets": {"hostNames": [host]}}}


def _vm(name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("memory", "128Mi")
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualMachine", "metadata": {"name": name}, "spec": spec}


def test_blocked_iso_deletions_do_not_delay_a_valid_vm(kube, operator, namespace, test_host_factory,
                                                       capsys) -> None:
    started = time.monotonic()
    good, media = uniq("hv-good"), uniq("hv-media")
    for name, cpus, mib in ((good, 8, 8192), (media, 4096, 1024 * 1024)):
        kube.create(HOST, {"metadata": {"name": name}, "spec": {"uri": test_host_factory(name, cpus=cpus,
                                                                                         memory_mib=mib)}})
        kube.wait_condition(HOST, name, "Ready", "True", timeout=30)
    isos = [f"img-{i}" for i in range(BLOCKED)]
    users = [f"user-{i}" for i in range(BLOCKED)]
    try:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda n: kube.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, ISO, _iso(n, media)), isos))
            list(pool.map(lambda i: kube.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, VM, _vm(users[i], hostRef=media, memory="16Mi", runStrategy="Halted",
                                                   disks=[{"name": "cd", "cdrom": {"isoImageRef": {"name": isos[i]}}}])),
                          range(BLOCKED)))

        # Our finalizer is added by the first reconcile of each image.
        kube.wait_for(lambda: sum(TEARDOWN in (o["metadata"].get("finalizers") or [])
                                  for o in _list(kube, namespace, ISO)) == BLOCKED,
                      timeout=120, interval=2, what="every ISOImage holds the teardown finalizer")
        created = time.monotonic()
        kube.custom.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, ISO)

        def all_blocked() -> list[dict[str, Any]] | None:
            items = _list(kube, namespace, ISO)
            ok = len(items) == BLOCKED and all(
                (condition(o, "Ready") or {}).get("reason") == "DeletionBlocked"
                # only ours holds it (no kopf finalizer, no worker sleeping on it)
                and o["metadata"].get("finalizers") == [TEARDOWN] for o in items)
            return items if ok else None

        items = kube.wait_for(all_blocked, timeout=180, interval=2, what="every ISOImage deletion blocked")
        blocked = time.monotonic()
        for obj in items[:3]:
            assert obj["status"]["error"]["code"] == "ISO_IN_USE" and obj["status"]["phase"] == "Deleting"
            assert f"user-{obj['metadata']['name'].split('-')[1]}" in obj["status"]["error"]["message"]

        # While every deletion is blocked (and retried), a valid VM is Ready within seconds.
        t0 = time.monotonic()
        kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VM, _vm("valid", hostRef=good))
        obj = kube.wait_condition(VM, "valid", "Ready", "True", namespace=namespace, timeout=60)
        valid_latency = time.monotonic() - t0
        assert obj["status"]["printableStatus"] == "Running"
        assert valid_latency < VALID_READY_WITHIN, f"valid VM Ready after {valid_latency:.1f}s"

        time.sleep(3)
        sample = kube.get(ISO, isos[0], namespace)
        assert sample is not None and sample["metadata"]["finalizers"] == [TEARDOWN]  # not released by itself

        # The users go: the images follow (woken by the VM deletions) and our finalizer is removed.
        t1 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda n: kube.delete(VM, n, namespace), users))
        kube.wait_for(lambda: not _list(kube, namespace, ISO), timeout=180, interval=1, what="every ISOImage gone")
        released = time.monotonic()
    finally:
        kube.custom.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, VM)
        kube.custom.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, ISO)
        kube.wait_for(lambda: not _list(kube, namespace, VM) and not _list(kube, namespace, ISO),
                      timeout=180, interval=2, what="cleanup")
        kube.delete(HOST, good)
        kube.delete(HOST, media)
    with capsys.disabled():
        print(f"\n[blocked ISOs={BLOCKED}] create {created - started:.1f}s, all blocked {blocked - created:.1f}s, "
              f"valid VM Ready {valid_latency:.1f}s, release after VMs deleted {released - t1:.1f}s, "
              f"total {released - started:.1f}s")

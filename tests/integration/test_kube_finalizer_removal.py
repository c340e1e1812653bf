"""Removing our finalizer on the real API server: the caller's cached list is tried first (no read), and
a list that changed since it was seen never makes the patch remove another finalizer."""

from __future__ import annotations

import asyncio
from typing import Any

from libvirt_operator.adapters.kube import KubeClient

VM = "virtualmachines"
OURS = "test.example/ours"  # not the operator's: an operator running in this session adds its own to any VM


def test_a_cached_list_is_tried_first_and_a_stale_one_never_removes_another_finalizer(kube, kubeconfig,
                                                                                     namespace) -> None:
    def make(name: str, finalizers: list[str]) -> None:
        kube.create(VM, {"metadata": {"name": name, "finalizers": finalizers},
                         "spec": {"hostRef": "nowhere", "memory": "64Mi"}}, namespace)

    def finalizers(name: str) -> list[str] | None:
        obj = kube.get(VM, name, namespace)
        return None if obj is None else [f for f in obj["metadata"].get("finalizers") or []
                                         if f.endswith(".example/ours") or f.startswith(("a.", "b."))]

    reads: list[str] = []

    class CountingKube(KubeClient):
        async def get_object(self, plural: str, name: str, namespace: str | None = None) -> Any:
            reads.append(name)
            return await super().get_object(plural, name, namespace)

    make("fresh", ["a.example/x", OURS, "b.example/y"])
    make("stale", ["a.example/x", OURS, "b.example/y"])
    make("gone-before", [OURS, "b.example/y"])

    async def scenario() -> list[bool]:
        base = await KubeClient.create(str(kubeconfig))
        client = CountingKube(base.api)
        try:
            results = [await client.remove_finalizer(VM, namespace, "fresh", OURS, seen=["a.example/x", OURS, "b.example/y"])]
            # Someone removed the first finalizer since our cache saw the list: position 1 is now b.example/y.
            kube.patch(VM, "stale", {"metadata": {"finalizers": [OURS, "b.example/y"]}}, namespace)
            results.append(await client.remove_finalizer(VM, namespace, "stale", OURS,
                                                         seen=["a.example/x", OURS, "b.example/y"]))
            # Ours went meanwhile (the list the cache shows still has it).
            kube.patch(VM, "gone-before", {"metadata": {"finalizers": ["b.example/y"]}}, namespace)
            results.append(await client.remove_finalizer(VM, namespace, "gone-before", OURS,
                                                          seen=[OURS, "b.example/y"]))
            results.append(await client.remove_finalizer(VM, namespace, "never-was", OURS, seen=[OURS]))
            return results
        finally:
            await base.close()

    assert asyncio.run(scenario()) == [True, True, False, False]
    assert finalizers("fresh") == ["a.example/x", "b.example/y"]
    assert finalizers("stale") == ["b.example/y"]  # not the b.example/y that took position 1
    assert finalizers("gone-before") == ["b.example/y"]
    assert reads == ["stale", "gone-before"]  # read only where the cached list was stale

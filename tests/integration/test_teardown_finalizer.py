"""The operator's own teardown finalizer is added by a patch of its own, on the real apiserver."""

from __future__ import annotations

import asyncio

import pytest

from libvirt_operator.adapters.kube import KubeClient
from libvirt_operator.handlers.teardown import TEARDOWN_FINALIZER

pytestmark = pytest.mark.usefixtures("without_session_operator")  # nobody else writes the objects


def test_the_teardown_finalizer_is_added_once_and_never_to_an_object_being_deleted(kube, kubeconfig,
                                                                                   namespace) -> None:
    """The apiserver refuses a new finalizer once a deletion started (HTTP 422). As a kopf patch function
    that refusal looked like a conflict: kopf kept the patch pending and ran none of the VM's handlers,
    its deletion included, so a VM deleted right after its creation could wait forever."""
    kube.create("virtualmachines", {"metadata": {"name": "fin", "finalizers": ["example.com/keep"]},
                                    "spec": {"hostRef": "nowhere", "memory": "128Mi"}}, namespace)

    async def add() -> bool:
        client = await KubeClient.create(str(kubeconfig))
        try:
            return await client.add_finalizer("virtualmachines", namespace, "fin", TEARDOWN_FINALIZER)
        finally:
            await client.close()

    def finalizers() -> list[str]:
        return kube.get("virtualmachines", "fin", namespace)["metadata"]["finalizers"]

    try:
        assert asyncio.run(add()) is True
        assert asyncio.run(add()) is True
        assert finalizers() == ["example.com/keep", TEARDOWN_FINALIZER]
        kube.patch("virtualmachines", "fin", {"metadata": {"finalizers": ["example.com/keep"]}}, namespace)
        kube.delete("virtualmachines", "fin", namespace)
        assert asyncio.run(add()) is False  # no exception, no retry loop
        assert finalizers() == ["example.com/keep"]
    finally:
        kube.patch("virtualmachines", "fin", {"metadata": {"finalizers": None}}, namespace)

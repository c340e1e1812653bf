"""A burst of API requests rides a few keep-alive connections to the real API server, not one new
TLS connection (and handshake: CPU on both ends) per request in flight."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from kubernetes.client.exceptions import ApiException

from libvirt_operator.adapters.kube import KubeClient
from libvirt_operator.adapters.kube.client import API_CONNECTIONS
from tests.harness.kube import GROUP, VERSION

BURST = 100


def _listable(kube: Any, namespace: str) -> bool:
    try:
        kube.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "virtualmachines")
    except ApiException as err:
        if err.status == 429:  # "storage is (re)initializing": the CRDs were applied just now
            return False
        raise
    return True


def test_a_burst_of_requests_reuses_a_bounded_set_of_connections(kube, kubeconfig, namespace) -> None:
    kube.wait_for(lambda: _listable(kube, namespace), what="the VirtualMachine watch cache initialised")
    opened: list[Any] = []

    async def on_connection_create_end(_session: Any, _ctx: Any, params: Any) -> None:
        opened.append(params)

    async def scenario() -> list[Any]:
        client = await KubeClient.create(str(kubeconfig))
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(on_connection_create_end)
        trace.freeze()
        client.api.rest_client.pool_manager.trace_configs.append(trace)
        try:
            first = await asyncio.gather(*(client.list_objects("virtualmachines", namespace) for _ in range(BURST)))
            second = await asyncio.gather(*(client.get_object("virtualmachines", f"none-{i}", namespace)
                                            for i in range(BURST)))
            return first + second
        finally:
            await client.close()

    results = asyncio.run(scenario())
    assert results == [[]] * BURST + [None] * BURST  # every request answered
    # at most the pool's size, for both bursts: the second reused the first's connections
    assert 1 <= len(opened) <= API_CONNECTIONS, len(opened)

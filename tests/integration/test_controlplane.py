"""The envtest-style control plane works: namespaces, CRDs and CEL validation."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

GROUP = "harness.example.com"
PLURAL = "widgets"
CRD_NAME = f"{PLURAL}.{GROUP}"

CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": CRD_NAME},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": PLURAL, "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["min", "max"],
                                "properties": {
                                    "min": {"type": "integer"},
                                    "max": {"type": "integer"},
                                },
                                "x-kubernetes-validations": [
                                    {"rule": "self.min <= self.max", "message": "min must not exceed max"}
                                ],
                            }
                        },
                    }
                },
            }
        ],
    },
}


@pytest.fixture
async def api(kubeconfig: Path) -> AsyncIterator[client.ApiClient]:
    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    async with client.ApiClient(cfg) as api_client:
        yield api_client


def widget(name: str, lo: int, hi: int) -> dict:
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"min": lo, "max": hi},
    }


async def wait_established(ext: client.ApiextensionsV1Api, name: str, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        crd = await ext.read_custom_resource_definition(name)
        conds = {c.type: c.status for c in (crd.status.conditions or [])} if crd.status else {}
        if conds.get("Established") == "True":
            return
        assert loop.time() < deadline, f"CRD {name} not Established: {conds}"
        await asyncio.sleep(0.1)


async def test_version_and_readyz(controlplane, api: client.ApiClient) -> None:
    info = await client.VersionApi(api).get_code()
    assert info.major == "1"
    assert info.git_version.startswith("v1.")
    assert controlplane.server_url.startswith("https://127.0.0.1:")


async def test_namespace_crd_and_cel_validation(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    ext = client.ApiextensionsV1Api(api)
    objs = client.CustomObjectsApi(api)

    ns = f"cp-test-{uuid.uuid4().hex[:8]}"
    await core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    assert (await core.read_namespace(ns)).status.phase == "Active"

    await ext.create_custom_resource_definition(CRD)
    try:
        await wait_established(ext, CRD_NAME)

        # The new endpoint can take a moment to be served after Established.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            try:
                created = await objs.create_namespaced_custom_object(
                    GROUP, "v1", ns, PLURAL, widget("ok", 1, 2)
                )
                break
            except ApiException as exc:
                if exc.status != 404 or loop.time() > deadline:
                    raise
                await asyncio.sleep(0.2)
        assert created["spec"] == {"min": 1, "max": 2}

        with pytest.raises(ApiException) as excinfo:
            await objs.create_namespaced_custom_object(GROUP, "v1", ns, PLURAL, widget("bad", 3, 2))
        assert excinfo.value.status == 422
        assert "min must not exceed max" in excinfo.value.body

        # Schema validation (not CEL) rejects too.
        with pytest.raises(ApiException) as excinfo:
            await objs.create_namespaced_custom_object(
                GROUP, "v1", ns, PLURAL, widget("typed", "x", 2)  # type: ignore[arg-type]
            )
        assert excinfo.value.status == 422

        listed = await objs.list_namespaced_custom_object(GROUP, "v1", ns, PLURAL)
        assert [o["metadata"]["name"] for o in listed["items"]] == ["ok"]
    finally:
        await ext.delete_custom_resource_definition(CRD_NAME)

"""A small async Kubernetes client for what kopf's handler kwargs do not cover.

Used for reading Secrets, listing resources and patching the status of objects other than the one a
handler is running for (e.g. a host resync that refreshes many VMs with one libvirt call).
It only ever writes the `status` subresource of our own kinds.
"""

from __future__ import annotations

import base64
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from ...core.api.common import GROUP, VERSION
from ...core.errors import AppError, ErrorCode

FIELD_MANAGER = "libvirt-operator"


def _api_error(err: ApiException, what: str) -> AppError:
    if err.status == 404:
        return AppError(ErrorCode.KUBERNETES_API_ERROR, f"{what}: not found", {"status": 404}, cause=err)
    return AppError(ErrorCode.KUBERNETES_API_ERROR, f"{what}: HTTP {err.status} {err.reason}",
                    {"status": err.status}, cause=err)


class KubeClient:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    @classmethod
    async def create(cls, kubeconfig: str | None = None) -> KubeClient:
        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            await config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        return cls(client.ApiClient(configuration=cfg))

    async def close(self) -> None:
        await self.api.close()

    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        try:
            secret = await self.core.read_namespaced_secret(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return None
            raise _api_error(err, f"reading Secret {namespace}/{name}") from err
        return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}

    async def list_objects(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        try:
            if namespace:
                result = await self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)
            else:
                result = await self.custom.list_cluster_custom_object(GROUP, VERSION, plural)
        except ApiException as err:
            raise _api_error(err, f"listing {plural}") from err
        return result.get("items", [])

    async def patch_status(self, plural: str, namespace: str | None, name: str,
                           status: dict[str, Any]) -> None:
        body = {"status": status}
        try:
            if namespace:
                await self.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, plural, name, body, field_manager=FIELD_MANAGER,
                    _content_type="application/merge-patch+json")
            else:
                await self.custom.patch_cluster_custom_object_status(
                    GROUP, VERSION, plural, name, body, field_manager=FIELD_MANAGER,
                    _content_type="application/merge-patch+json")
        except ApiException as err:
            if err.status == 404:
                return  # deleted meanwhile: nothing to report on
            raise _api_error(err, f"patching status of {plural} {namespace or ''}/{name}") from err

"""A small async Kubernetes client for what kopf's handler kwargs do not cover.

Used for reading Secrets, listing resources and patching the status of objects other than the one a
handler is running for (e.g. a host resync that refreshes many VMs with one libvirt call).
It only ever writes the `status` subresource of our own kinds, and removes the operator's own
teardown finalizer (handlers.vm, handlers.vm_teardown) once a blocked VM deletion could finish.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from aiohttp.helpers import get_env_proxy_for_url
from kubernetes_asyncio import client, config
from kubernetes_asyncio.config import kube_config
from kubernetes_asyncio.client.exceptions import ApiException
from yarl import URL

from ...core.api.common import GROUP, VERSION
from ...core.errors import AppError, ErrorCode
from ...core.metrics import REST_CLIENT_REQUESTS, REST_CLIENT_SECONDS
from ...core.timestamps import timestamp

FIELD_MANAGER = "libvirt-operator"
API_CONNECTIONS = 16


def api_error(err: ApiException, what: str) -> AppError:
    if err.status == 404:
        return AppError(ErrorCode.KUBERNETES_API_ERROR, f"{what}: not found", {"status": 404}, cause=err)
    return AppError(ErrorCode.KUBERNETES_API_ERROR, f"{what}: HTTP {err.status} {err.reason}",
                    {"status": err.status}, cause=err)


class ConflictError(AppError):
    """A write whose resourceVersion precondition failed (HTTP 409): someone else wrote first."""


def _instrument(rest: Any) -> None:
    """client-go's rest_client_* metrics around every request of this ApiClient (its REST client
    is the one place all of them pass through)."""
    request = rest.request

    @functools.wraps(request)
    async def timed(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        verb, host = method.upper(), urllib.parse.urlsplit(url).netloc
        started = time.perf_counter()
        code = "<error>"
        try:
            response = await request(method, url, *args, **kwargs)
            code = str(getattr(response, "status", "") or "<error>")
            return response
        except ApiException as err:
            code = str(err.status or "<error>")
            raise
        finally:
            REST_CLIENT_SECONDS.labels(verb, host).observe(time.perf_counter() - started)
            REST_CLIENT_REQUESTS.labels(code, verb, host).inc()

    rest.request = timed


@contextlib.contextmanager
def _credential_files() -> Iterator[str]:
    """A private directory for the certificate and key a kubeconfig embeds. kubernetes_asyncio writes them
    to files it removes only at a clean exit (never after a SIGKILL), and reads them only while the client
    is built: they go as soon as it is, so no key outlives the process on disk."""
    directory = tempfile.mkdtemp(prefix="lvop-kubeconfig-")
    try:
        yield directory
    finally:
        # its content -> file cache would hand out the removed files to the next client (private name)
        cache: dict[str, str] = getattr(kube_config, "_temp_files", {})
        for content, name in list(cache.items()):
            if os.path.dirname(name) == directory:
                del cache[content]
        shutil.rmtree(directory, ignore_errors=True)


def _api_client(cfg: client.Configuration) -> client.ApiClient:
    """kubernetes_asyncio's session trusts the environment, so every request looked up ~/.netrc and the
    proxy variables in a worker thread: two thread hops per request. The proxy for the API server is
    looked up once, here; netrc never applies (the API server authenticates by cert or token)."""
    if not cfg.proxy:
        with contextlib.suppress(LookupError, ValueError):
            proxy, auth = get_env_proxy_for_url(URL(cfg.host))
            cfg.proxy = str(proxy)
            if auth is not None:
                cfg.proxy_headers = {"Proxy-Authorization": auth.encode()}
    # Keep-alive connections, at most this many (kubernetes_asyncio's default is 100): a burst of VMs
    # opened one per write in flight, ~2.6 ms of TLS handshake CPU each (client and apiserver
    # together), where a few busy connections carry the same writes (client-go multiplexes one).
    cfg.connection_pool_maxsize = API_CONNECTIONS
    api = client.ApiClient(configuration=cfg)
    api.rest_client.pool_manager._trust_env = False  # noqa: SLF001  (aiohttp has no setter)
    return api


class KubeClient:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        _instrument(api.rest_client)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    @classmethod
    async def create(cls, kubeconfig: str | None = None) -> KubeClient:
        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            with _credential_files() as directory:
                await config.load_kube_config(config_file=kubeconfig, client_configuration=cfg,
                                              temp_file_path=directory)
                return cls(_api_client(cfg))  # reads the files into its TLS context
        return cls(_api_client(cfg))

    async def close(self) -> None:
        await self.api.close()

    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        try:
            secret = await self.core.read_namespaced_secret(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return None
            raise api_error(err, f"reading Secret {namespace}/{name}") from err
        return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}

    async def list_objects(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        try:
            if namespace:
                result = await self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)
            else:
                result = await self.custom.list_cluster_custom_object(GROUP, VERSION, plural)
        except ApiException as err:
            raise api_error(err, f"listing {plural}") from err
        return result.get("items", [])

    async def get_object(self, plural: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """One object, fresh from the apiserver, by a list with a field selector (the operator's RBAC
        has list, not get, on its kinds). None when it does not exist."""
        try:
            if namespace:
                result = await self.custom.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, plural, field_selector=f"metadata.name={name}")
            else:
                result = await self.custom.list_cluster_custom_object(
                    GROUP, VERSION, plural, field_selector=f"metadata.name={name}")
        except ApiException as err:
            raise api_error(err, f"reading {plural} {namespace or ''}/{name}") from err
        items = result.get("items", [])
        return items[0] if items else None

    async def namespace_labels(self, name: str) -> dict[str, str] | None:
        """A namespace's labels (None: no such namespace), by a list with a field selector (list/watch
        on namespaces is what the operator has, for its namespace cache)."""
        try:
            result = await self.core.list_namespace(field_selector=f"metadata.name={name}")
        except ApiException as err:
            raise api_error(err, f"reading namespace {name}") from err
        return dict(result.items[0].metadata.labels or {}) if result.items else None

    async def _json_patch(self, plural: str, namespace: str, name: str, ops: list[dict[str, Any]]) -> Any:
        return await self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, name, ops, field_manager=FIELD_MANAGER,
            _content_type="application/json-patch+json")

    async def add_finalizer(self, plural: str, namespace: str, name: str, finalizer: str, attempts: int = 3) -> bool:
        """Add one finalizer; False when the object is gone or being deleted (`ensure_finalizer`)."""
        return await self.ensure_finalizer(plural, namespace, name, finalizer, attempts) is not None

    async def ensure_finalizer(self, plural: str, namespace: str, name: str, finalizer: str,
                               attempts: int = 3, known: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """Add one finalizer (a JSON patch with the object's resourceVersion as precondition: a concurrent
        change is re-read, never overwritten). Returns the object carrying it, as written or read; None
        when the object is gone or being deleted (the apiserver refuses new finalizers then). `known`: a
        cached copy to try first (no read when it is current)."""
        for attempt in range(attempts + (known is not None)):
            obj = dict(known) if attempt == 0 and known is not None else await self.get_object(plural, name, namespace)
            meta = (obj or {}).get("metadata") or {}
            if obj is None or meta.get("deletionTimestamp"):
                return None
            finalizers = list(meta.get("finalizers") or [])
            if finalizer in finalizers:
                return obj
            add = ({"op": "add", "path": "/metadata/finalizers/-", "value": finalizer} if finalizers else
                   {"op": "add", "path": "/metadata/finalizers", "value": [finalizer]})
            ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": meta.get("resourceVersion")}, add]
            try:
                written = await self._json_patch(plural, namespace, name, ops)
            except ApiException as err:
                if err.status == 404:
                    return None
                if err.status in (409, 422):
                    continue  # changed meanwhile (or now being deleted): read again
                raise api_error(err, f"adding finalizer {finalizer} to {plural} {namespace}/{name}") from err
            return written if isinstance(written, dict) else obj
        raise AppError(ErrorCode.KUBERNETES_API_ERROR,
                       f"adding finalizer {finalizer} to {plural} {namespace}/{name}: the object kept changing",
                       {"status": 409})

    async def remove_finalizer(self, plural: str, namespace: str, name: str, finalizer: str,
                               seen: Sequence[str] | None = None) -> bool:
        """Remove one finalizer (a JSON patch that tests its position first, so a concurrent change of
        the list fails instead of removing another one). False when it is not there (or the object is gone).
        `seen`: the finalizers as the caller's watch cache shows them, tried first without a GET (a
        1,000-VM deletion reads 1,000 fewer objects); a stale list fails the test and is read afresh."""
        if seen is not None and finalizer in seen:
            removed = await self._remove_finalizer_at(plural, namespace, name, finalizer, list(seen).index(finalizer))
            if removed is not None:
                return removed
        obj = await self.get_object(plural, name, namespace)
        finalizers = list(((obj or {}).get("metadata") or {}).get("finalizers") or [])
        if finalizer not in finalizers:
            return False
        return bool(await self._remove_finalizer_at(plural, namespace, name, finalizer, finalizers.index(finalizer),
                                                    stale_ok=False))

    async def _remove_finalizer_at(self, plural: str, namespace: str, name: str, finalizer: str, index: int,
                                   stale_ok: bool = True) -> bool | None:
        """True: removed; False: the object is gone; None: not at that position (`stale_ok`)."""
        ops = [{"op": "test", "path": f"/metadata/finalizers/{index}", "value": finalizer},
               {"op": "remove", "path": f"/metadata/finalizers/{index}"}]
        try:
            await self._json_patch(plural, namespace, name, ops)
        except ApiException as err:
            if err.status == 404:
                return False
            if err.status == 422 and stale_ok:  # the test op failed: the list changed since it was seen
                return None
            raise api_error(err, f"removing finalizer {finalizer} of {plural} {namespace}/{name}") from err
        return True

    async def patch_status(self, plural: str, namespace: str | None, name: str,
                           status: dict[str, Any], resource_version: str | None = None) -> dict[str, Any] | None:
        """Merge-patch the status subresource. With `resource_version`, only if the object is still at
        that version (else ConflictError): a read-modify-write that cannot lose a concurrent write.
        Returns the object as written (None when it is gone)."""
        body: dict[str, Any] = {"status": status}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            if namespace:
                return await self.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, plural, name, body, field_manager=FIELD_MANAGER,
                    _content_type="application/merge-patch+json")
            return await self.custom.patch_cluster_custom_object_status(
                GROUP, VERSION, plural, name, body, field_manager=FIELD_MANAGER,
                _content_type="application/merge-patch+json")
        except ApiException as err:
            if err.status == 404:
                return None  # deleted meanwhile: nothing to report on
            if err.status == 409 and resource_version is not None:
                raise ConflictError(ErrorCode.KUBERNETES_API_ERROR,
                                    f"status of {plural} {namespace or ''}/{name} changed meanwhile",
                                    {"status": 409}, cause=err) from err
            raise api_error(err, f"patching status of {plural} {namespace or ''}/{name}") from err

    async def post_cluster_event(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """An Event about a cluster-scoped object, shaped the way `kubectl describe` finds it: in namespace
        default, involvedObject without a namespace and with the object's uid (kopf's own events put
        `default` into involvedObject.namespace, which kubectl's field selector never matches)."""
        now = timestamp()
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{involved.get('name', 'object')}.", "namespace": "default"},
                "involvedObject": {k: v for k, v in involved.items() if k != "namespace" and v},
                "type": type_, "reason": reason, "message": message[:1024],
                "source": {"component": FIELD_MANAGER}, "reportingComponent": FIELD_MANAGER,
                "reportingInstance": FIELD_MANAGER, "firstTimestamp": now, "lastTimestamp": now, "count": 1}
        try:
            await self.core.create_namespaced_event("default", body)
        except ApiException as err:
            raise api_error(err, f"posting an Event about {involved.get('kind')} {involved.get('name')}") from err

"""Who is calling an aggregated API served by the operator, and may they?

The kube-apiserver's front proxy authenticates the user, then calls the operator with its proxy client
certificate and the user in X-Remote-User / X-Remote-Group / X-Remote-Extra-*. Those headers are
trusted only from a connection whose client certificate chains to the requestheader CA (and, when
the cluster names them, carries one of the allowed common names) — both published by the apiserver in
kube-system/extension-apiserver-authentication. The decision is the cluster's: a SubjectAccessReview.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.parse
from collections.abc import Mapping

from kubernetes_asyncio.client import AuthorizationV1Api
from kubernetes_asyncio.client.exceptions import ApiException

from ...core.errors import AppError, ErrorCode
from .client import KubeClient, api_error

AUTH_CONFIGMAP_NAMESPACE, AUTH_CONFIGMAP = "kube-system", "extension-apiserver-authentication"


@dataclasses.dataclass(frozen=True)
class RequestHeaderConfig:
    client_ca_pem: str
    allowed_names: tuple[str, ...]  # empty: any cert from the CA
    username_headers: tuple[str, ...] = ("X-Remote-User",)
    group_headers: tuple[str, ...] = ("X-Remote-Group",)
    extra_prefixes: tuple[str, ...] = ("X-Remote-Extra-",)


@dataclasses.dataclass(frozen=True)
class Caller:
    user: str
    groups: tuple[str, ...]
    extra: Mapping[str, tuple[str, ...]]


async def read_requestheader_config(kube: KubeClient) -> RequestHeaderConfig:
    """The front proxy's CA and names (needs the extension-apiserver-authentication-reader Role)."""
    try:
        cm = await kube.core.read_namespaced_config_map(AUTH_CONFIGMAP, AUTH_CONFIGMAP_NAMESPACE)
    except ApiException as err:
        raise api_error(err, f"reading ConfigMap {AUTH_CONFIGMAP_NAMESPACE}/{AUTH_CONFIGMAP}") from err
    data = cm.data or {}
    ca = data.get("requestheader-client-ca-file") or ""
    if not ca.strip():
        raise AppError(ErrorCode.KUBERNETES_API_ERROR,
                       f"{AUTH_CONFIGMAP_NAMESPACE}/{AUTH_CONFIGMAP} has no requestheader-client-ca-file: the "
                       "kube-apiserver runs without --requestheader-client-ca-file (no front proxy)", {})

    def names(key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        raw = data.get(key)
        return tuple(json.loads(raw)) if raw else default

    return RequestHeaderConfig(
        client_ca_pem=ca, allowed_names=names("requestheader-allowed-names"),
        username_headers=names("requestheader-username-headers", ("X-Remote-User",)),
        group_headers=names("requestheader-group-headers", ("X-Remote-Group",)),
        extra_prefixes=names("requestheader-extra-headers-prefix", ("X-Remote-Extra-",)))


def caller_from_headers(config: RequestHeaderConfig, headers: Mapping[str, str] | object) -> Caller | None:
    """The user the front proxy vouches for (call only for a verified front-proxy connection)."""
    getall = getattr(headers, "getall", None)

    def values(name: str) -> list[str]:
        return list(getall(name, [])) if getall else ([headers[name]] if name in headers else [])  # type: ignore[operator,index]

    user = next((v for h in config.username_headers for v in values(h) if v), None)
    if not user:
        return None
    groups = tuple(v for h in config.group_headers for v in values(h))
    extra: dict[str, list[str]] = {}
    for key in getattr(headers, "keys", lambda: [])():
        for prefix in config.extra_prefixes:
            if key.lower().startswith(prefix.lower()):
                name = urllib.parse.unquote(key[len(prefix):]).lower()
                extra.setdefault(name, []).extend(values(key))
    return Caller(user=user, groups=groups, extra={k: tuple(dict.fromkeys(v)) for k, v in extra.items()})


async def may(kube: KubeClient, caller: Caller, *, verb: str, group: str, resource: str, subresource: str,
              namespace: str, name: str) -> tuple[bool, str]:
    """A SubjectAccessReview for `caller`; (allowed, the authorizer's reason)."""
    body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {
        "user": caller.user, "groups": list(caller.groups), "extra": {k: list(v) for k, v in caller.extra.items()},
        "resourceAttributes": {"verb": verb, "group": group, "resource": resource, "subresource": subresource,
                               "namespace": namespace, "name": name}}}
    try:
        review = await AuthorizationV1Api(kube.api).create_subject_access_review(body)
    except ApiException as err:
        raise api_error(err, "creating a SubjectAccessReview") from err
    status = review.status
    return bool(status and status.allowed and not status.denied), (status.reason or "") if status else ""

"""Kubernetes Events that `kubectl describe` shows: kopf's for namespaced objects; for cluster-scoped
ones (LibvirtHost) an Event with no namespace in involvedObject, which is how kubectl looks for them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from ..core.errors import AppError
from ..core.logs import get_logger
from ..reconcile.runtime import Runtime

log = get_logger(__name__)


async def post_event(rt: Runtime, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    meta = body.get("metadata") or {}
    if meta.get("namespace"):
        kopf.event(body, type=type_, reason=reason, message=message)
        return
    involved = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "name": meta.get("name"),
                "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")}
    try:
        await rt.kube.post_cluster_event(involved, type_, reason, message)
    except AppError as err:  # an Event is best effort; the status says the same
        log.info("posting an Event failed", kind=body.get("kind"), name=meta.get("name"), reason=reason,
                 error=err.message)

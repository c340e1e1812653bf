"""Namespace labels for LibvirtHost namespaceSelector: a watch-fed cache (reconcile.tenancy).

A label change wakes the VMs parked on placement (e.g. NamespaceNotAllowed), so labelling a namespace
admits its VMs within about a second; placed VMs see the change at their host's next sweep.
Needs list/watch on namespaces (manifests/deploy/20-clusterrole.yaml).
"""

from __future__ import annotations

from typing import Any

import kopf

from ..reconcile.tenancy import namespace_labels_of
from .startup import runtime_of
from .vm import state_of


@kopf.on.event("", "v1", "namespaces")
async def watch_namespaces(type: str | None, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    rt = runtime_of(memo)
    cache = namespace_labels_of(rt)
    if type == "DELETED":
        cache.forget(name)
        return
    if cache.update(name, (body.get("metadata") or {}).get("labels") or {}):
        state_of(rt).parked_wake.set()

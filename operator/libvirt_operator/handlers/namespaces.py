"""Namespace labels for LibvirtHost namespaceSelector: a watch-fed cache (reconcile.tenancy).

A label change wakes the VMs parked on placement (e.g. NamespaceNotAllowed), so labelling a namespace
admits its VMs within about a second; the namespace's placed VMs are queued too (a host may no longer
admit them: they are then never restarted).
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
        st = state_of(rt)
        st.parked_wake.set()
        for uid, vm in list(st.vms.items()):
            if vm["metadata"].get("namespace") == name and (vm.get("status") or {}).get("host"):
                st.retry.add(uid)

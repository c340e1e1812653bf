"""Watch events as the controllers' caches keep them: plain copies, and for VirtualMachines, an event
that is older than the answer of the operator's own write does not take that write back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def plain_copy(body: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": dict(body.get("metadata") or {}), "spec": dict(body.get("spec") or {}),
            "status": dict(body.get("status") or {})}


def older(obj: Mapping[str, Any], than: Mapping[str, Any]) -> bool:
    """Whether `obj` is an older version of the same object than `than`. resourceVersions are meant to
    be opaque; the API server's are etcd revisions, which only grow. Compared only when both are
    integers: anything else counts as not older (the newest arrival wins, as before)."""
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion")) < \
            int((than.get("metadata") or {}).get("resourceVersion"))
    except (TypeError, ValueError):
        return False


def from_watch(event: Mapping[str, Any], cached: Mapping[str, Any] | None) -> dict[str, Any]:
    """The cache entry for a watch event. An event older than what our own write answered (it was on its
    way before that write) keeps what the write set, status, finalizers and resourceVersion: else the
    cache would go back (a VM placed a moment ago showing no host: its next run searches the hosts for
    its domain and posts "Adopted"; the next write's precondition stale)."""
    vm = plain_copy(event)
    if cached is not None and older(event, cached):
        vm["status"] = dict(cached.get("status") or {})
        for key in ("resourceVersion", "finalizers"):
            if key in cached["metadata"]:
                vm["metadata"][key] = cached["metadata"][key]
    return vm

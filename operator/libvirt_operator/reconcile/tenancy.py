"""Namespace labels for LibvirtHost namespaceSelector, and which namespaces this operator instance owns.

The labels come from a watch-fed cache (handlers.namespaces); a namespace the cache has not seen yet
(created a moment ago) is read once from the apiserver. Decisions themselves are pure (reconcile.plan).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .runtime import Runtime

_KEY = "namespace_labels"


class NamespaceLabels:
    """name → labels of the cluster's namespaces, as the watch last reported them."""

    def __init__(self, kube: Any) -> None:
        self.kube = kube
        self.labels: dict[str, dict[str, str]] = {}

    def update(self, name: str, labels: Mapping[str, str] | None) -> bool:
        """Record a namespace; True when its labels changed."""
        new = dict(labels or {})
        changed = self.labels.get(name) != new
        self.labels[name] = new
        return changed

    def forget(self, name: str) -> None:
        self.labels.pop(name, None)

    async def get(self, name: str) -> Mapping[str, str] | None:
        """The namespace's labels; None when it does not exist."""
        if name in self.labels:
            return self.labels[name]
        labels = await self.kube.namespace_labels(name)
        if labels is not None:
            self.labels[name] = labels
        return labels


def namespace_labels_of(rt: Runtime) -> NamespaceLabels:
    cache = rt.extras.get(_KEY)
    if cache is None:
        cache = rt.extras[_KEY] = NamespaceLabels(rt.kube)
    return cache


def watched(patterns: Iterable[str]) -> Callable[[str], bool]:
    """Whether this instance watches a namespace, given its --namespace patterns (kopf's syntax: globs,
    comma-separated, `!` excludes; no pattern = every namespace)."""
    patterns = [p for p in patterns if p]
    if not patterns:
        return lambda _ns: True
    return lambda ns: any(_match(ns, p) for p in patterns)


def _match(name: str, pattern: str) -> bool:
    # Same algorithm as kopf's match_namespace (kopf/_cogs/structs/references.py), so the orphan
    # report covers exactly the namespaces kopf serves.
    globs = [g.strip() for g in pattern.split(",")]
    if not globs or globs[0].startswith("!"):
        globs.insert(0, "*")
    matches = first = fnmatch.fnmatch(name, globs[0])
    for glob in globs[1:]:
        if glob.startswith("!"):
            matches = matches and not fnmatch.fnmatch(name, glob.lstrip("!"))
        else:
            matches = matches or (first and fnmatch.fnmatch(name, glob))
    return matches

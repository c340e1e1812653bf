"""Process-wide collaborators shared by every reconcile (kept in kopf's memo)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..adapters.kube import KubeClient
from ..adapters.libvirt import HostPool
from ..core.settings import Settings


@dataclasses.dataclass
class Runtime:
    settings: Settings
    pool: HostPool
    kube: KubeClient
    remediator: Any | None = None  # adapters.rag.KnowledgeBase, or None when disabled
    # The --namespace patterns this instance serves (empty: all namespaces). Sharded instances each
    # report the orphaned domains of their own namespaces only.
    namespaces: tuple[str, ...] = ()
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

"""Orphaned domains: a host round's check for owned domains no VirtualMachine accounts for, and the
write of this instance's entries into the LibvirtHost's status.orphanedDomains (decisions:
reconcile.orphans)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from ..adapters.kube import ConflictError
from ..adapters.libvirt import domains
from ..core.logs import get_logger
from ..core.metrics import ORPHANED_DOMAINS
from ..reconcile import orphans
from ..reconcile.runtime import Runtime
from ..reconcile.tenancy import watched
from .vm_state import VmState

log = get_logger(__name__)


async def check_orphans(rt: Runtime, st: VmState, host: str, conn: Any, observed: Mapping[str, Any]) -> None:
    st.orphan_checked[host] = time.monotonic()
    owns = watched(rt.namespaces)
    unknown = orphans.unaccounted(observed, st.vms)
    candidates = await conn.call("owners", lambda c: domains.owners(c, unknown)) if unknown else {}
    # Domains of namespaces this instance does not watch are another instance's to judge.
    candidates = orphans.own_candidates(candidates, owns)
    confirmed = orphans.confirmed_orphans(candidates, st.orphan_candidates.get(host, set()))
    st.orphan_candidates[host] = {u for u, meta in candidates.items() if meta.owner is not None}
    ORPHANED_DOMAINS.labels(host).set(len(confirmed))
    entries = orphans.orphan_status(candidates, confirmed)
    current = ((st.hosts.get(host) or {}).get("status") or {}).get("orphanedDomains") or []
    if entries != orphans.own_entries(current, owns):
        if entries:
            log.warning("orphaned domains on host", kind="LibvirtHost", name=host,
                        domains=[e["uuid"] for e in entries])
        await _write_orphans(rt, st, host, entries, owns)


ORPHAN_WRITE_ATTEMPTS = 5


async def _write_orphans(rt: Runtime, st: VmState, host: str, entries: list[dict[str, Any]],
                         owns: Callable[[str], bool]) -> None:
    """Replace this instance's entries of the host's orphanedDomains, keeping every other instance's:
    read the host fresh, merge, write with its resourceVersion as precondition; on a conflict (another
    instance or the probe wrote meanwhile) read and merge again."""
    for _ in range(ORPHAN_WRITE_ATTEMPTS):
        obj = await rt.kube.get_object("libvirthosts", host)
        if obj is None:
            return
        current = (obj.get("status") or {}).get("orphanedDomains") or []
        merged = orphans.merge_entries(current, entries, owns)
        if merged != current:
            try:
                await rt.kube.patch_status("libvirthosts", None, host, {"orphanedDomains": merged or None},
                                           resource_version=obj["metadata"]["resourceVersion"])
            except ConflictError:
                continue
        cached = st.hosts.get(host)
        if cached is not None:  # newer than the cache until the watch delivers it
            cached["status"] = {**(cached.get("status") or {}), "orphanedDomains": merged}
        return
    log.info("orphanedDomains not written: the host's status kept changing", kind="LibvirtHost", name=host)

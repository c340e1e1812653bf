"""Orphaned domains: domains our metadata says belong to a VirtualMachine that no longer exists.

They are reported (LibvirtHost status, metric, log), never deleted: a domain may hold data, and the
VM may come back from a backup of the cluster. Pure functions; the handler does the I/O.

Sharding: an instance started with --namespace patterns only sees the VirtualMachines of those
namespaces, so it judges only domains whose owner namespace it watches (`own_candidates`), and it
rewrites only those entries of the host's status.orphanedDomains (`merge_entries`, written with a
resourceVersion precondition): instances with disjoint namespaces never erase each other's entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any


def unaccounted(observed_uuids: Iterable[str], vm_uids: Iterable[str]) -> set[str]:
    """Domains on the host whose UUID is no VirtualMachine's uid (candidates; may be foreign)."""
    return set(observed_uuids) - set(vm_uids)


def confirmed_orphans(candidates: Mapping[str, Any], previous: set[str]) -> set[str]:
    """Owned domains seen unaccounted twice in a row: one sighting may just be a watch that has not
    delivered a new VM yet (e.g. right after an operator restart)."""
    return {uuid for uuid, meta in candidates.items() if meta.owner is not None and uuid in previous}


def orphan_status(candidates: Mapping[str, Any], orphans: set[str]) -> list[dict[str, str]]:
    entries = []
    for uuid in sorted(orphans, key=lambda u: (candidates[u].owner.namespace, candidates[u].owner.name, u)):
        owner = candidates[uuid].owner
        entries.append({"uuid": uuid, "namespace": owner.namespace, "name": owner.name})
    return entries


def own_candidates(candidates: Mapping[str, Any], owns: Callable[[str], bool]) -> dict[str, Any]:
    """Drop owned domains of namespaces this instance does not watch: it cannot know their VMs.
    (Foreign domains, without an owner, stay: they are never reported anyway.)"""
    return {u: m for u, m in candidates.items() if m.owner is None or owns(m.owner.namespace)}


def own_entries(entries: Iterable[Mapping[str, Any]], owns: Callable[[str], bool]) -> list[dict[str, Any]]:
    """The entries of a host's status.orphanedDomains that this instance is responsible for."""
    return [dict(e) for e in entries if owns(str(e.get("namespace", "")))]


def merge_entries(current: Iterable[Mapping[str, Any]], mine: Iterable[Mapping[str, Any]],
                  owns: Callable[[str], bool]) -> list[dict[str, Any]]:
    """The host's new orphanedDomains: other instances' entries (namespaces we do not watch) kept as
    they are, ours replaced by `mine`; sorted by namespace, name, uuid."""
    kept = [dict(e) for e in current if not owns(str(e.get("namespace", "")))]
    merged = {e.get("uuid"): e for e in [*kept, *(dict(e) for e in mine)]}
    return sorted(merged.values(), key=lambda e: (e.get("namespace", ""), e.get("name", ""), e.get("uuid", "")))

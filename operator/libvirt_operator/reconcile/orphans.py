"""Orphaned domains: domains our metadata says belong to a VirtualMachine that no longer exists.

They are reported (LibvirtHost status, metric, log), never deleted: a domain may hold data, and the
VM may come back from a backup of the cluster. Pure functions; the handler does the I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
    for uuid in sorted(orphans, key=lambda u: (candidates[u].owner.namespace, candidates[u].owner.name)):
        owner = candidates[uuid].owner
        entries.append({"uuid": uuid, "namespace": owner.namespace, "name": owner.name})
    return entries

"""The ISOImage controller's per-process state: the watch-fed cache of ISOImages, the work queue
(`IsoState.queue`, handlers.requeue), and what the work item remembers between runs (the status as
we last wrote it, permanent failures, what a failed image waits for, the running imports' stop
events). Also the trigger rule: which ISOImage watch events queue the key (`needs_reconcile`)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any

from ..core.errors import ErrorCode
from ..reconcile.failures import retry_delay
from ..reconcile.runtime import Runtime
from .requeue import Requeue

PLURAL = "isoimages"
# Image work items running at once (an import streams to hosts for minutes; the operator-wide import
# slots, --max-concurrent-imports, bound the downloads within them). Not the VM queue's workers.
WORKERS = int(os.environ.get("LIBVIRT_OPERATOR_ISO_WORKERS", "8"))
BUSY_RETRY_SECONDS = 0.5
DELETE_RETRY_CAP_SECONDS = 30.0       # a deletion blocked by a host looks again at least this often
IN_USE_RECHECK_SECONDS = 60.0         # one blocked by a VM is woken by that VM; this is the safety net
# Per-key backoff = the status' retry.nextRetryTime (reconcile.failures.retry_delay: 5 s … 300 s).
RETRY_BASE_SECONDS = retry_delay(1)
RETRY_CAP_SECONDS = retry_delay(1_000)
# A failed image waiting for a host: looked at again when a LibvirtHost changes (Ready, labels, spec).
WAITS_FOR_HOSTS = {ErrorCode.NO_SCHEDULABLE_HOST, ErrorCode.HOST_NOT_FOUND}


class IsoState:
    """Per-process state of the ISOImage controller (kept in Runtime.extras)."""

    def __init__(self) -> None:
        self.isos: dict[str, dict[str, Any]] = {}            # uid → object as the watch last saw it
        self.uids: dict[tuple[str, str], str] = {}           # (namespace, name) → uid
        self.written: dict[str, dict[str, Any]] = {}         # uid → status as we last wrote it (newer than the cache)
        self.final: dict[str, int] = {}                      # uid → generation that failed permanently
        self.waiting: dict[str, ErrorCode | None] = {}       # uid → last attempt's error code (None: Ready)
        self.stops: dict[str, asyncio.Event] = {}            # uid → stop event of its running import
        self.queue = Requeue(RETRY_BASE_SECONDS, RETRY_CAP_SECONDS, name="isoimage")
        self.queue_task: asyncio.Task[None] | None = None
        self.wake_task: asyncio.Task[None] | None = None
        self.host_views: dict[str, tuple[Any, ...]] = {}    # host → what targets depend on (`host_view`)
        self.hosts_wake = asyncio.Event()                    # a LibvirtHost changed (debounced, handlers.iso)
        self.became_ready: set[str] = set()                  # … hosts among them that became Ready
        self.hosts_index: Mapping[str, Any] | None = None    # kopf's iso_hosts index (live view)

    def remember(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        self.isos[meta["uid"]] = obj
        self.uids[(meta["namespace"], meta["name"])] = meta["uid"]

    def stop(self, uid: str) -> None:
        """Its running import (if any) stops at its next check (deletion, operator exit)."""
        event = self.stops.get(uid)
        if event is not None:
            event.set()

    def deleting(self, uid: str) -> bool:
        obj = self.isos.get(uid)
        return obj is None or bool(obj["metadata"].get("deletionTimestamp"))

    def forget(self, uid: str) -> None:
        """The ISOImage is gone."""
        self.stop(uid)
        obj = self.isos.pop(uid, None)
        if obj is not None:
            meta = obj["metadata"]
            if self.uids.get((meta["namespace"], meta["name"])) == uid:
                del self.uids[(meta["namespace"], meta["name"])]
        self.written.pop(uid, None)
        self.final.pop(uid, None)
        self.waiting.pop(uid, None)
        self.queue.forget(uid)

    def hosts(self) -> dict[str, dict[str, Any]] | None:
        """The LibvirtHosts as the watch last saw them (None before the first ISOImage event: list)."""
        if self.hosts_index is None:
            return None
        return {host: obj for host, store in self.hosts_index.items() for obj in store}


def state_of(rt: Runtime) -> IsoState:
    state = rt.extras.get("iso")
    if state is None:
        state = rt.extras["iso"] = IsoState()
    return state


def needs_reconcile(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> str | None:
    """Why this ISOImage watch event queues its key, or None (our own status writes, resyncs: nothing).

    Annotations and finalizers matter only while the image is being deleted (the force-release
    annotation; a finalizer of someone else gone): outside a deletion they start no import."""
    if before is None:
        return "new"  # created, or first seen after a (re)start
    old, new = before.get("metadata") or {}, after.get("metadata") or {}
    if old.get("generation") != new.get("generation"):
        return "spec"
    if bool(old.get("deletionTimestamp")) != bool(new.get("deletionTimestamp")):
        return "deletion"
    if new.get("deletionTimestamp") and old.get("annotations") != new.get("annotations"):
        return "annotations"
    if new.get("deletionTimestamp") and old.get("finalizers") != new.get("finalizers"):
        return "finalizers"
    return None


def waits_for(obj: Mapping[str, Any] | None, code: ErrorCode | None, became_ready: set[str]) -> bool:
    """Whether a host change may unblock this image (its last attempt ended with `code`): a Ready image
    may have a new target; a missing host may be there now; a named host that was not Ready may be."""
    if code is None or code in WAITS_FOR_HOSTS:
        return True
    if code is not ErrorCode.HOST_UNREACHABLE or not became_ready:
        return False
    names = (((obj or {}).get("spec") or {}).get("targets") or {}).get("hostNames") or []
    return not names or bool(became_ready.intersection(names))


def host_view(host: Mapping[str, Any] | None) -> tuple[Any, ...] | None:
    """What an image's targets depend on: labels, spec, deletion, readiness (not probe timestamps)."""
    if host is None:
        return None
    meta = host.get("metadata") or {}
    return (meta.get("labels"), bool(meta.get("deletionTimestamp")), host.get("spec"), host_ready(host))


def host_ready(host: Mapping[str, Any] | None) -> bool:
    conditions = ((host or {}).get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

"""ISOImage controller: what makes an ISOImage be looked at. Every trigger only adds the image's key
(its uid) to the ISO work queue (`IsoState.queue`, handlers.requeue); the queue runs the one work item
(handlers.iso_reconcile.reconcile_iso_key) for due keys, one worker per key, with per-key backoff and
at most WORKERS (env LIBVIRT_OPERATOR_ISO_WORKERS, 8) at once: a long upload holds an ISO worker,
never a VM's.

Triggers: an ISOImage watch event that needs a reconcile (first seen, new generation: the backoff
starts over, deletion started, and while deleting annotations (force-release) or finalizers changed;
our own status writes queue nothing); a LibvirtHost change (labels, spec, readiness: debounced) adds
the Ready images (new targets) and those waiting for a host; a VM that referenced an image changes or
goes adds that image while it is being deleted (its deletion may have waited for that VM). The work
item itself schedules the periodic resync of a Ready image (iso_resync_seconds), the safety net.

A running import stops at once when its image's deletion starts (the watch sets its stop event; the
key then runs again and tears down) and when the operator exits. kopf is the event source
(`@kopf.on.event`) and owns liveness; it keeps no handler state and no finalizer on ISOImages (our
`…/teardown` finalizer, added by the work item before any import, holds an image for its teardown).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Iterable
from typing import Any

import kopf

from ..core.api.common import GROUP, VERSION
from ..core.logs import get_logger
from ..reconcile.runtime import Runtime
from .iso_reconcile import reconcile_iso_key
from .iso_state import PLURAL, WORKERS, IsoState, host_ready, host_view, needs_reconcile, state_of, waits_for
from .startup import runtime_of
from .watch_copies import plain_copy

log = get_logger(__name__)
WAKE_DEBOUNCE_SECONDS = 0.2      # a burst of host events adds the images once
STOP_GRACE_SECONDS = 2.0         # at exit, running imports get this long to stop by themselves


@kopf.index(GROUP, VERSION, "libvirthosts", id="iso_hosts")
async def iso_hosts(name: str, body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
    """The LibvirtHosts as the watch last saw them, for choosing import targets: no listing of all
    hosts per image per resync (kopf fills indexes before any handler runs: never half-filled)."""
    return {name: copy.deepcopy({k: body.get(k) for k in ("metadata", "spec", "status")})}


@kopf.on.event(GROUP, VERSION, PLURAL)
async def watch_iso_images(type: str | None, uid: str, body: kopf.Body, memo: kopf.Memo,
                           iso_hosts: kopf.Index[str, dict[str, Any]], **_: Any) -> None:
    rt = runtime_of(memo)
    st = state_of(rt)
    st.hosts_index = iso_hosts  # a live view: the work item reads it for every attempt
    if type == "DELETED":
        st.forget(uid)
        return
    before = st.isos.get(uid)
    obj = plain_copy(body)
    st.remember(obj)
    reason = needs_reconcile(before, obj)
    if reason == "deletion":
        st.stop(uid)  # a running import stops now; the key runs again afterwards and tears down
        st.waiting.pop(uid, None)  # host changes no longer concern it
    if reason in ("spec", "deletion"):
        st.queue.reset(uid)  # the backoff starts over
    if reason is not None:
        log.debug("ISOImage queued", namespace=obj["metadata"]["namespace"], name=obj["metadata"]["name"],
                  reason=reason)
        st.queue.add(uid)
    _ensure_loops(rt, st)


@kopf.on.event(GROUP, VERSION, "libvirthosts")
async def watch_hosts_for_images(type: str | None, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A host's labels, spec or readiness changed (not a probe timestamp): images may have a new target."""
    st = state_of(runtime_of(memo))
    before = st.host_views.get(name)
    after = None if type == "DELETED" else host_view(body)
    if after is None:
        st.host_views.pop(name, None)
    else:
        st.host_views[name] = after
    if before != after:
        if after is not None and host_ready(body) and not (before is not None and before[-1]):
            st.became_ready.add(name)
        st.hosts_wake.set()


def vm_references_changed(rt: Runtime, namespace: str, names: Iterable[str]) -> None:
    """A VM that referenced these ISOImages changed or is gone (handlers.vm): a deletion that waited
    for it runs at once."""
    st = rt.extras.get("iso")
    if not isinstance(st, IsoState):
        return
    for name in names:
        uid = st.uids.get((namespace, name))
        obj = st.isos.get(uid) if uid is not None else None
        if obj is not None and obj["metadata"].get("deletionTimestamp"):
            st.queue.add(uid)


def _ensure_loops(rt: Runtime, st: IsoState) -> None:
    """The queue's loop and the host wake loop, started from a handler so they inherit kopf's context
    (Kubernetes Event posting)."""
    if st.queue_task is None or st.queue_task.done():
        st.queue_task = asyncio.create_task(
            st.queue.run(lambda key: reconcile_iso_key(rt, st, key), concurrency=WORKERS), name="iso-work-queue")
    if st.wake_task is None or st.wake_task.done():
        st.wake_task = asyncio.create_task(_wake_loop(st), name="iso-wake-loop")


async def _wake_loop(st: IsoState) -> None:
    """Host changes add the images they may concern (`waits_for`), once per burst (debounced)."""
    while True:
        await st.hosts_wake.wait()
        await asyncio.sleep(WAKE_DEBOUNCE_SECONDS)
        st.hosts_wake.clear()
        ready, st.became_ready = st.became_ready, set()
        for uid, code in list(st.waiting.items()):
            if waits_for(st.isos.get(uid), code, ready):
                st.queue.add(uid)


@kopf.on.cleanup()
async def stop_iso_queue(memo: kopf.Memo, **_: Any) -> None:
    """Running imports stop by themselves first (their partial files go); then the loops are cancelled."""
    rt = memo.get("runtime")
    st = rt.extras.get("iso") if rt is not None else None
    if not isinstance(st, IsoState):
        return
    for uid in list(st.stops):
        st.stop(uid)
    deadline = asyncio.get_running_loop().time() + STOP_GRACE_SECONDS
    while st.stops and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    for task in (st.queue_task, st.wake_task):
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

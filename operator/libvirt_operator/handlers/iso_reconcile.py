"""The ISOImage controller's one work item: `reconcile_iso_key(uid)`, run by the ISO work queue
(`IsoState.queue`) and by nothing else. Whatever should make an image be looked at (its watch event,
a LibvirtHost change, a VM that referenced it changing or going) only adds its key to the queue.

One run: read the cached object; deleting → the teardown (volumes go, then our finalizer; blocked:
DeletionBlocked status, the queue retries with backoff); else our finalizer on the object first, then
one import attempt (reconcile.iso.reconcile_iso) and its status. When the key runs next is decided
here and only here: Ready → the periodic resync (new target hosts, vanished volumes); retryable
failure → the queue's per-key backoff (its count is what status.retry.count reports); permanent
failure → nothing until the generation changes.

Which status an attempt starts from is ours: the status as this process last wrote it (the cache's
copy may lag behind our own writes, or be a stale copy someone wrote). The object's own status is used
only for the first look after a start (a retry still due later, or a permanent failure, is honoured).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from typing import Any

import kopf
import structlog

from ..core.api.common import FORCE_RELEASE_ANNOTATION
from ..core.conditions import READY, get_condition
from ..core.errors import AppError, ErrorCode
from ..core.logs import get_logger
from ..core.timestamps import parse_time
from ..reconcile.iso import reconcile_iso
from ..reconcile.iso_delete import deletion_blocked_status, delete_iso
from ..reconcile.runtime import Runtime
from ..reconcile.status import merge_patch
from .instrument import ended_with, reconciler, working
from .iso_state import BUSY_RETRY_SECONDS, DELETE_RETRY_CAP_SECONDS, IN_USE_RECHECK_SECONDS, PLURAL, IsoState
from .teardown import TEARDOWN_FINALIZER

log = get_logger(__name__)


@reconciler("isoimage", "ISOImage", timer=True)  # counted when it does work (`working`)
async def reconcile_iso_key(rt: Runtime, st: IsoState, uid: str) -> None:
    obj = st.isos.get(uid)
    if obj is None:
        st.queue.done(uid)  # gone
        return
    meta = obj["metadata"]
    with structlog.contextvars.bound_contextvars(kind="ISOImage", namespace=meta["namespace"], name=meta["name"]):
        try:
            if meta.get("deletionTimestamp"):
                await _tear_down(rt, st, obj)
            else:
                await _import(rt, st, obj)
        except AppError as err:  # a status patch or the finalizer failed: back off and try again
            log.info("ISOImage reconcile failed", code=err.code.value, error=err.message)
            ended_with(err)
            st.queue.failed(uid)


# --------------------------------------------------------------------------------------------
# Deletion
# --------------------------------------------------------------------------------------------

async def _tear_down(rt: Runtime, st: IsoState, obj: dict[str, Any]) -> None:
    meta = obj["metadata"]
    uid, namespace, name = meta["uid"], meta["namespace"], meta["name"]
    if TEARDOWN_FINALIZER not in (meta.get("finalizers") or []):
        st.queue.done(uid)  # released, or deleted before any import (nothing of ours anywhere)
        return
    working()
    status = st.written.get(uid, dict(obj.get("status") or {}))
    force = (meta.get("annotations") or {}).get(FORCE_RELEASE_ANNOTATION) == "true"
    try:
        await delete_iso(namespace, name, uid, status, rt, force=force)
    except AppError as err:
        log.info("ISOImage deletion blocked", code=err.code.value, error=err.message)
        ended_with(err)
        new = await deletion_blocked_status(err, status, meta.get("generation") or 0, rt)
        patch = merge_patch(status, new)
        if patch:  # blocked, or blocked by something else now
            await rt.kube.patch_status(PLURAL, namespace, name, patch)
            st.written[uid] = new
            kopf.event(obj, type="Warning", reason=err.reason, message=err.message)
        if err.code is ErrorCode.ISO_IN_USE:
            # A change of any VM that uses it adds the key at once (handlers.vm): no retry storm of
            # every blocked image while the VMs stay, only a slow safety net.
            st.queue.schedule(uid, IN_USE_RECHECK_SECONDS)
        else:  # a host that did not answer: back off
            st.queue.failed(uid, at_most=DELETE_RETRY_CAP_SECONDS)
        return
    await rt.kube.remove_finalizer(PLURAL, namespace, name, TEARDOWN_FINALIZER, seen=meta.get("finalizers") or [])
    st.queue.done(uid)  # its DELETED event forgets the key


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------

async def _import(rt: Runtime, st: IsoState, obj: dict[str, Any]) -> None:
    meta = obj["metadata"]
    uid, namespace, name = meta["uid"], meta["namespace"], meta["name"]
    generation = meta.get("generation") or 0
    if st.final.get(uid) == generation:
        st.queue.done(uid)  # a permanent failure: final until the spec (generation) changes
        return
    status = st.written.get(uid)
    if status is None:  # the first look since this process started
        status = st.written[uid] = dict(obj.get("status") or {})
        if _first_look(st, uid, status, generation):
            return
    if not await _held(rt, st, obj):
        return  # being deleted meanwhile: its watch event queues the key again
    working()
    stale = {**(obj.get("status") or {}), **status}  # every key the stored status may have
    status = dict(status)
    attempts = st.queue.attempts(uid)  # the queue counts failures in a row; status.retry reports it
    if attempts:
        status["retry"] = {"count": attempts}
    else:
        status.pop("retry", None)
    stop = st.stops[uid] = asyncio.Event()  # set by the watch when the deletion starts, and at exit

    def should_stop() -> bool:  # the deletion may also have started before the event was there
        return stop.is_set() or st.deleting(uid)

    try:
        outcome = await reconcile_iso(namespace, name, uid, generation, dict(obj.get("spec") or {}), status, rt,
                                      should_stop=should_stop, hosts=st.hosts())
    finally:
        if st.stops.get(uid) is stop:
            del st.stops[uid]
    ended_with(outcome.error)
    if uid not in st.isos:
        return  # gone meanwhile (forgotten): nothing to record
    st.written[uid] = dict(outcome.written)
    if outcome.aborted:  # stopped on request (deletion, exit): nothing was decided, look again
        st.queue.schedule(uid, BUSY_RETRY_SECONDS)
        return
    _post_event(obj, status, outcome.status, outcome.error)
    # The reconcile patched status along the way: write the outcome whole (removed keys as null).
    if merge_patch(outcome.written, outcome.status):
        await rt.kube.patch_status(PLURAL, namespace, name, outcome.final_patch(stale))
    st.written[uid] = dict(outcome.status)
    error = outcome.error
    st.waiting[uid] = None if error is None else error.code
    if error is None:
        st.queue.done(uid)  # backoff over
        st.queue.schedule(uid, rt.settings.iso_resync_seconds)  # new targets, vanished volumes
    elif not (outcome.status.get("retry") or {}).get("nextRetryTime"):
        st.final[uid] = generation
        st.queue.done(uid)
    else:
        st.queue.failed(uid)  # = retry.nextRetryTime: same count, same delay


def _first_look(st: IsoState, uid: str, status: dict[str, Any], generation: int) -> bool:
    """An attempt this process did not make left this status: True when nothing is due now (a
    permanent failure, or a retry due later: the queue takes over the count and the time)."""
    if status.get("observedGeneration") != generation or not status.get("error"):
        return False  # a new spec, or Ready: look now (a Ready image's resync)
    retry = status.get("retry") or {}
    st.queue.restore(uid, int(retry.get("count") or 0))
    with contextlib.suppress(ValueError):
        st.waiting[uid] = ErrorCode((status.get("error") or {}).get("code"))
    next_at = retry.get("nextRetryTime")
    if not next_at:
        st.final[uid] = generation
        st.queue.done(uid)
        return True
    at = parse_time(next_at)
    wait = (at - dt.datetime.now(dt.timezone.utc)).total_seconds() if at else 0.0
    if wait <= 0:
        return False
    st.queue.schedule(uid, wait)
    return True


async def _held(rt: Runtime, st: IsoState, obj: dict[str, Any]) -> bool:
    """Our finalizer holds the image before anything is uploaded, so a deletion always finds its
    teardown to run. Raises (back off) when it cannot be added yet."""
    meta = obj["metadata"]
    if TEARDOWN_FINALIZER in (meta.get("finalizers") or []):
        return True
    written = await rt.kube.ensure_finalizer(PLURAL, meta["namespace"], meta["name"], TEARDOWN_FINALIZER,
                                             known=obj)
    if written is None:
        return False
    fresh = written.get("metadata") or {}
    meta["finalizers"] = list(fresh.get("finalizers") or [])
    meta["resourceVersion"] = fresh.get("resourceVersion")
    return True


def _post_event(obj: dict[str, Any], was_status: dict[str, Any], status: dict[str, Any],
                error: AppError | None) -> None:
    """An Event when Ready's status or reason changed. Progress (queued, importing) and waiting for a
    host that is not there yet are not warnings."""
    was = get_condition(was_status.get("conditions"), READY) or {}
    ready = get_condition(status.get("conditions"), READY) or {}
    if (was.get("status"), was.get("reason")) == (ready.get("status"), ready.get("reason")):
        return
    quiet = error is None or error.code in (ErrorCode.NO_SCHEDULABLE_HOST, ErrorCode.HOST_NOT_FOUND)
    kopf.event(obj, type="Normal" if ready.get("status") == "True" or quiet else "Warning",
               reason=ready.get("reason", "Unknown"), message=ready.get("message", ""))

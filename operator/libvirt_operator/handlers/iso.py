"""ISOImage handlers: a timer that runs an import attempt when one is due, and a finalizer.

The timer (like LibvirtHost's probe) is cheap when idle: it only acts on a new generation, a due
retry, or a periodic resync (new target hosts). Long transfers run inside the timer and stop when
kopf signals `stopped` (deletion, operator exit).

What is due is decided from an in-memory record per ISOImage (`Attempt`: the generation and status
of the last attempt, and when the next one is due), not from the status the timer is handed: under
load kopf's copy lags behind our own writes, and a stale copy (no error, older observedGeneration)
would start the import again on every tick. A permanent failure is final until the generation
changes; retryable ones back off exponentially (the count lives in the record, so a stale copy
cannot reset it). The status is used only for the first look after a start.

A blocked deletion (a VM still uses the image, a host did not answer) costs no kopf worker: the
delete handler records DeletionBlocked and returns, the operator's own teardown finalizer (added at
create/resume) keeps the image, and one requeue loop (handlers.requeue) retries it with backoff, woken
when a VM that referenced the image changes or goes (handlers.vm calls `wake_deletions`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import datetime as dt
import time
from collections.abc import Iterable
from typing import Any

import kopf

from ..core.api.common import FORCE_RELEASE_ANNOTATION, GROUP, VERSION
from ..core.conditions import READY, get_condition
from ..core.errors import AppError, ErrorCode
from ..core.logs import get_logger
from ..core.timestamps import parse_time
from ..reconcile.failures import retry_delay
from ..reconcile.iso import reconcile_iso
from ..reconcile.iso_delete import deletion_blocked_status, delete_iso
from ..reconcile.iso_status import PLURAL, due
from ..reconcile.runtime import Runtime
from ..reconcile.status import merge_patch
from .instrument import ended_with, reconciler, working
from .requeue import Requeue
from .teardown import TEARDOWN_FINALIZER, held_for_teardown, hold_for_teardown, release_teardown
from .startup import runtime_of

log = get_logger(__name__)
TICK_SECONDS = 2.0
_ATTEMPTS = "iso_attempts"


@dataclasses.dataclass
class Attempt:
    """The last import attempt of one ISOImage, as this process knows it."""

    generation: int
    status: dict[str, Any]     # the status as we last wrote it (newer than any copy kopf hands us)
    next_due: float | None     # monotonic; None: final until the spec (generation) changes
    failures: int = 0          # attempts in a row that raised (not an error status: those count in status)


def attempts_of(rt: Runtime) -> dict[str, Attempt]:
    return rt.extras.setdefault(_ATTEMPTS, {})


def _next_due(status: dict[str, Any], rt: Runtime, now: float, *, ours: bool) -> float | None:
    """When the next attempt is due after one that left this status (`ours`: just written by this
    process, so the backoff counts from now; else the status' own nextRetryTime decides)."""
    if not status.get("error"):
        return now + rt.settings.iso_resync_seconds  # Ready: look for new targets, vanished volumes
    retry = status.get("retry") or {}
    next_at = retry.get("nextRetryTime")
    if not next_at:
        return None  # permanent: waits for a spec change
    if ours:
        return now + retry_delay(int(retry.get("count") or 1))  # what nextRetryTime says, on our clock
    at = parse_time(next_at)
    return now + max(0.0, (at - dt.datetime.now(dt.timezone.utc)).total_seconds()) if at else now


@kopf.on.startup()
async def iso_daemon_settings(settings: kopf.OperatorSettings, **_: Any) -> None:
    """A deleted ISOImage waits for its running import (a timer) to stop before the finalizer goes.

    The import stops within ~0.3 s of kopf's signal; kopf's defaults would only look again after
    60 s (cancellation_polling), so a deletion during a download would hang for a minute.
    """
    settings.background.instant_exit_timeout = max(settings.background.instant_exit_timeout or 0, 1.0)
    settings.background.cancellation_polling = min(settings.background.cancellation_polling, 2.0)


@kopf.index(GROUP, VERSION, "libvirthosts", id="iso_hosts")
async def iso_hosts(name: str, body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
    """The LibvirtHosts as the watch last saw them, for choosing import targets: no listing of all
    hosts per image per resync (kopf fills indexes before any handler runs: never half-filled)."""
    return {name: copy.deepcopy({k: body.get(k) for k in ("metadata", "spec", "status")})}


@kopf.timer(GROUP, VERSION, PLURAL, interval=TICK_SECONDS, initial_delay=0)
@reconciler("isoimage", "ISOImage", timer=True)
async def import_iso(name: str, namespace: str, spec: dict[str, Any], status: dict[str, Any],
                     meta: dict[str, Any], body: kopf.Body, memo: kopf.Memo, stopped: Any,
                     iso_hosts: kopf.Index[str, dict[str, Any]], **_: Any) -> None:
    rt = runtime_of(memo)
    uid = meta["uid"]
    records = attempts_of(rt)
    if meta.get("deletionTimestamp"):
        records.pop(uid, None)
        return
    generation = meta.get("generation") or 0
    now = time.monotonic()
    record = records.get(uid)
    if record is not None:
        status = dict(record.status)  # ours is newer than the timer's copy, whatever that says
        if record.generation == generation and (record.next_due is None or now < record.next_due):
            return
    else:
        status = dict(status or {})  # the first look since this process started
        if not due(status, generation, resync_due=True):
            records[uid] = Attempt(generation, status, _next_due(status, rt, now, ours=False))
            return
    # Recorded before the attempt: a tick while it runs (or one that crashes) starts nothing new.
    failures = record.failures if record is not None and record.generation == generation else 0
    records[uid] = attempt = Attempt(generation, status, now + retry_delay(failures + 1), failures + 1)
    working()
    hosts = {host: obj for host, store in iso_hosts.items() for obj in store}
    outcome = await reconcile_iso(namespace, name, uid, generation, dict(spec), status, rt,
                                  should_stop=stopped.is_set, hosts=hosts)
    ended_with(outcome.error)
    if outcome.aborted:
        attempt.next_due = time.monotonic()  # stopped on request: nothing was decided
        return
    was = (get_condition(status.get("conditions"), READY) or {})
    ready = (get_condition(outcome.status.get("conditions"), READY) or {})
    if (was.get("status"), was.get("reason")) != (ready.get("status"), ready.get("reason")):
        # Progress (queued, importing) and waiting for a host that is not there yet are not warnings.
        quiet = outcome.error is None or outcome.error.code in (ErrorCode.NO_SCHEDULABLE_HOST,
                                                                ErrorCode.HOST_NOT_FOUND)
        kopf.event(body, type="Normal" if ready.get("status") == "True" or quiet else "Warning",
                   reason=ready.get("reason", "Unknown"), message=ready.get("message", ""))
    # The reconcile patched status along the way: the handler's copy is stale, write it whole.
    if merge_patch(outcome.written, outcome.status):
        await rt.kube.patch_status(PLURAL, namespace, name, outcome.final_patch(status))
    records[uid] = Attempt(generation, dict(outcome.status),
                           _next_due(outcome.status, rt, time.monotonic(), ours=True))


# Our own finalizer, next to kopf's (added at create/resume: none can be added once a deletion
# started): it keeps an ISOImage whose deletion is blocked (a VM still uses it, a host did not answer)
# after kopf's finalizer is gone, so the retries run in ONE requeue loop instead of sleeping in a kopf
# worker. Woken at once when a VM that referenced the image changes or goes (`wake_deletions`).
_TEARDOWN = "iso_teardown"
DELETE_RETRY_BASE_SECONDS = 2.0
DELETE_RETRY_CAP_SECONDS = 30.0
DELETE_RETRY_CONCURRENCY = 4
BUSY_RETRY_SECONDS = 0.5


class TeardownState:
    """Blocked ISOImage deletions of this process: keys "namespace/name" in one requeue heap."""

    def __init__(self) -> None:
        self.retry = Requeue(DELETE_RETRY_BASE_SECONDS, DELETE_RETRY_CAP_SECONDS, name="isoimage_teardown")
        self.task: asyncio.Task[None] | None = None

    def ensure_loop(self, rt: Runtime) -> None:
        # Started from a handler so it inherits kopf's context (Kubernetes Event posting).
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(
                self.retry.run(lambda key: _retry_deletion(rt, self, key), concurrency=DELETE_RETRY_CONCURRENCY),
                name="iso-teardown-loop")


def teardown_of(rt: Runtime) -> TeardownState:
    state = rt.extras.get(_TEARDOWN)
    if state is None:
        state = rt.extras[_TEARDOWN] = TeardownState()
    return state


def wake_deletions(rt: Runtime, namespace: str, names: Iterable[str]) -> None:
    """A VM that referenced these ISOImages changed or is gone: blocked deletions are due at once."""
    state = rt.extras.get(_TEARDOWN)
    if state is not None:
        state.retry.wake(f"{namespace}/{name}" for name in names)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
async def hold_image(meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    if not meta.get("deletionTimestamp") and TEARDOWN_FINALIZER not in (meta.get("finalizers") or []):
        await hold_for_teardown(runtime_of(memo), PLURAL, meta)  # our own patch (see handlers.teardown)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def watch_held_images(type: str | None, name: str, namespace: str, meta: kopf.Meta, memo: kopf.Memo,
                            **_: Any) -> None:
    """An ISOImage held only by our finalizer (e.g. after a restart) is retried by the loop."""
    if type == "DELETED" or not held_for_teardown(meta):
        return
    rt = runtime_of(memo)
    state = teardown_of(rt)
    key = f"{namespace}/{name}"
    if key not in state.retry:
        state.retry.schedule(key, 0)
    state.ensure_loop(rt)


async def _blocked(rt: Runtime, err: AppError, namespace: str, name: str, status: dict[str, Any],
                   generation: int) -> None:
    new = await deletion_blocked_status(err, status, generation, rt)
    patch = merge_patch(status, new)
    if patch:
        await rt.kube.patch_status(PLURAL, namespace, name, patch)


@kopf.on.delete(GROUP, VERSION, PLURAL)
@reconciler("isoimage", "ISOImage")
async def delete_image(name: str, namespace: str, status: dict[str, Any], meta: dict[str, Any],
                       body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, retry: int, **_: Any) -> None:
    rt = runtime_of(memo)
    force = (meta.get("annotations") or {}).get(FORCE_RELEASE_ANNOTATION) == "true"
    attempts_of(rt).pop(meta["uid"], None)
    held = TEARDOWN_FINALIZER in (meta.get("finalizers") or [])
    state = teardown_of(rt)
    key = f"{namespace}/{name}"
    try:
        await delete_iso(namespace, name, meta["uid"], dict(status or {}), rt, force=force)
    except AppError as err:
        await _blocked(rt, err, namespace, name, dict(status or {}), meta.get("generation") or 0)
        if retry == 0:
            kopf.event(body, type="Warning", reason=err.reason, message=err.message)
        if held:
            # Return: kopf drops its finalizer, ours keeps the object; the requeue loop retries
            # (`_retry_deletion`) without holding a kopf worker, and removes ours when it may go.
            state.retry.failed(key)
            state.ensure_loop(rt)
            return
        # Deleted before our finalizer was added: kopf's is all that holds it.
        raise kopf.TemporaryError(err.message, delay=min(30.0, 2.0 * (2 ** min(retry, 4))))
    state.retry.done(key)
    if held:
        # Ours goes first, by itself, while kopf's still holds the object: a patch function in kopf's
        # final patch can lose a resourceVersion race, and kopf never returns to an object without its
        # own finalizer.
        try:
            await rt.kube.remove_finalizer(PLURAL, namespace, name, TEARDOWN_FINALIZER)
            return
        except AppError as err:
            log.info("removing the teardown finalizer failed; kopf's patch tries again",
                     iso=key, code=err.code.value, error=err.message)
    patch.fns.append(release_teardown)


async def _retry_deletion(rt: Runtime, state: TeardownState, key: str) -> None:
    namespace, name = key.split("/", 1)
    obj = await rt.kube.get_object(PLURAL, name, namespace)
    meta = (obj or {}).get("metadata") or {}
    if obj is None or not meta.get("deletionTimestamp") or TEARDOWN_FINALIZER not in (meta.get("finalizers") or []):
        state.retry.done(key)
        return
    if not held_for_teardown(meta):  # kopf's finalizer not removed yet: look again shortly
        state.retry.schedule(key, BUSY_RETRY_SECONDS)
        return
    status = dict(obj.get("status") or {})
    force = (meta.get("annotations") or {}).get(FORCE_RELEASE_ANNOTATION) == "true"
    try:
        await delete_iso(namespace, name, meta["uid"], status, rt, force=force)
    except AppError as err:
        log.info("ISOImage deletion still blocked", namespace=namespace, name=name, code=err.code.value,
                 error=err.message)
        try:
            await _blocked(rt, err, namespace, name, status, meta.get("generation") or 0)
        finally:
            state.retry.failed(key)
        return
    try:
        await rt.kube.remove_finalizer(PLURAL, namespace, name, TEARDOWN_FINALIZER)
    except AppError as err:
        log.info("ISOImage finalizer removal failed", namespace=namespace, name=name, error=err.message)
        state.retry.failed(key)
        return
    state.retry.done(key)


@kopf.on.cleanup()
async def stop_iso_teardown(memo: kopf.Memo, **_: Any) -> None:
    rt = memo.get("runtime")
    state = rt.extras.get(_TEARDOWN) if rt is not None else None
    if state is not None and state.task is not None and not state.task.done():
        state.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await state.task

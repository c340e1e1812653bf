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
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from typing import Any

import kopf

from ..core.api.common import FORCE_RELEASE_ANNOTATION, GROUP, VERSION
from ..core.conditions import READY, get_condition
from ..core.errors import AppError
from ..reconcile.failures import parse_time, retry_delay
from ..reconcile.iso import PLURAL, deletion_blocked_status, delete_iso, due, reconcile_iso
from ..reconcile.runtime import Runtime
from ..reconcile.status import merge_patch
from .instrument import reconciler
from .startup import runtime_of

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
    try:
        at = parse_time(str(next_at))
    except ValueError:
        return now
    return now + max(0.0, (at - dt.datetime.now(dt.timezone.utc)).total_seconds()) if at else now


@kopf.on.startup()
async def iso_daemon_settings(settings: kopf.OperatorSettings, **_: Any) -> None:
    """A deleted ISOImage waits for its running import (a timer) to stop before the finalizer goes.

    The import stops within ~0.3 s of kopf's signal; kopf's defaults would only look again after
    60 s (cancellation_polling), so a deletion during a download would hang for a minute.
    """
    settings.background.instant_exit_timeout = max(settings.background.instant_exit_timeout or 0, 1.0)
    settings.background.cancellation_polling = min(settings.background.cancellation_polling, 2.0)


@kopf.timer(GROUP, VERSION, PLURAL, interval=TICK_SECONDS, initial_delay=0)
@reconciler("isoimage", "ISOImage")
async def import_iso(name: str, namespace: str, spec: dict[str, Any], status: dict[str, Any],
                     meta: dict[str, Any], body: kopf.Body, memo: kopf.Memo, stopped: Any,
                     **_: Any) -> None:
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
    outcome = await reconcile_iso(namespace, name, uid, generation, dict(spec), status, rt,
                                  should_stop=stopped.is_set)
    if outcome.aborted:
        attempt.next_due = time.monotonic()  # stopped on request: nothing was decided
        return
    was = (get_condition(status.get("conditions"), READY) or {})
    ready = (get_condition(outcome.status.get("conditions"), READY) or {})
    if (was.get("status"), was.get("reason")) != (ready.get("status"), ready.get("reason")):
        kopf.event(body, type="Normal" if ready.get("status") == "True" else "Warning",
                   reason=ready.get("reason", "Unknown"), message=ready.get("message", ""))
    # The reconcile patched status along the way: the handler's copy is stale, write it whole.
    if merge_patch(outcome.written, outcome.status):
        await rt.kube.patch_status(PLURAL, namespace, name, outcome.final_patch(status))
    records[uid] = Attempt(generation, dict(outcome.status),
                           _next_due(outcome.status, rt, time.monotonic(), ours=True))


@kopf.on.delete(GROUP, VERSION, PLURAL)
@reconciler("isoimage", "ISOImage")
async def delete_image(name: str, namespace: str, status: dict[str, Any], meta: dict[str, Any],
                       body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    rt = runtime_of(memo)
    force = (meta.get("annotations") or {}).get(FORCE_RELEASE_ANNOTATION) == "true"
    attempts_of(rt).pop(meta["uid"], None)
    try:
        await delete_iso(namespace, name, meta["uid"], dict(status or {}), rt, force=force)
    except AppError as err:
        new = await deletion_blocked_status(err, dict(status or {}), meta.get("generation") or 0, rt)
        await rt.kube.patch_status(PLURAL, namespace, name, merge_patch(dict(status or {}), new))
        if retry == 0:
            kopf.event(body, type="Warning", reason=err.reason, message=err.message)
        raise kopf.TemporaryError(err.message, delay=min(30.0, 2.0 * (2 ** min(retry, 4))))

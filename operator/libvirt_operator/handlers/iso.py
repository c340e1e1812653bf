"""ISOImage handlers: a timer that runs an import attempt when one is due, and a finalizer.

The timer (like LibvirtHost's probe) is cheap when idle: it only acts on a new generation, a due
retry, or a periodic resync (new target hosts). Long transfers run inside the timer and stop when
kopf signals `stopped` (deletion, operator exit).
"""

from __future__ import annotations

import time
from typing import Any

import kopf

from ..core.api.common import FORCE_RELEASE_ANNOTATION, GROUP, VERSION
from ..core.conditions import READY, get_condition
from ..core.errors import AppError
from ..reconcile.iso import PLURAL, deletion_blocked_status, delete_iso, due, reconcile_iso
from ..reconcile.status import merge_patch
from .instrument import reconciler
from .startup import runtime_of

TICK_SECONDS = 2.0
_LAST_SYNC = "iso_last_sync"


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
    if meta.get("deletionTimestamp"):
        return
    status = dict(status or {})
    generation = meta.get("generation") or 0
    rt = runtime_of(memo)
    # once Ready: look for new target hosts and vanished volumes every iso_resync_seconds
    resync_due = time.monotonic() - float(memo.get(_LAST_SYNC) or 0) >= rt.settings.iso_resync_seconds
    if not due(status, generation, resync_due=resync_due):
        return
    memo[_LAST_SYNC] = time.monotonic()
    outcome = await reconcile_iso(namespace, name, meta["uid"], generation, dict(spec), status, rt,
                                  should_stop=stopped.is_set)
    if outcome.aborted:
        return
    was = (get_condition(status.get("conditions"), READY) or {})
    now = (get_condition(outcome.status.get("conditions"), READY) or {})
    if (was.get("status"), was.get("reason")) != (now.get("status"), now.get("reason")):
        kopf.event(body, type="Normal" if now.get("status") == "True" else "Warning",
                   reason=now.get("reason", "Unknown"), message=now.get("message", ""))
    # The reconcile patched status along the way: the handler's copy is stale, write it whole.
    if merge_patch(outcome.written, outcome.status):
        await rt.kube.patch_status(PLURAL, namespace, name, outcome.final_patch(status))


@kopf.on.delete(GROUP, VERSION, PLURAL)
@reconciler("isoimage", "ISOImage")
async def delete_image(name: str, namespace: str, status: dict[str, Any], meta: dict[str, Any],
                       body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    rt = runtime_of(memo)
    force = (meta.get("annotations") or {}).get(FORCE_RELEASE_ANNOTATION) == "true"
    try:
        await delete_iso(namespace, name, meta["uid"], dict(status or {}), rt, force=force)
    except AppError as err:
        new = await deletion_blocked_status(err, dict(status or {}), meta.get("generation") or 0, rt)
        await rt.kube.patch_status(PLURAL, namespace, name, merge_patch(dict(status or {}), new))
        if retry == 0:
            kopf.event(body, type="Warning", reason=err.reason, message=err.message)
        raise kopf.TemporaryError(err.message, delay=min(30.0, 2.0 * (2 ** min(retry, 4))))

"""ISOImage status: the writer an import reports through (patches only what changed, progress at
most once per second), the Ready and failed statuses of an attempt, and whether one is due."""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING, Any

from ..core.conditions import summarize
from ..core.errors import AppError, ErrorCode
from ..core.logs import get_logger
from ..core.metrics import ISO_FAILURES
from ..core.timestamps import parse_time, timestamp
from .failures import error_status, human_message, retry_delay
from .runtime import Runtime
from .status import merge_patch

if TYPE_CHECKING:  # an annotation only: iso_targets imports this module
    from .iso_targets import Target

log = get_logger(__name__)

PLURAL = "isoimages"
KIND = "ISOImage"
PROGRESS_INTERVAL = 1.0  # at most one progress patch per second


class StatusWriter:
    """Merge-patches the status subresource and remembers what it wrote (the handler's copy is stale)."""

    def __init__(self, rt: Runtime, namespace: str, name: str, current: dict[str, Any]) -> None:
        self.rt, self.namespace, self.name = rt, namespace, name
        self.current = dict(current)
        self._last_progress = 0.0
        self.patches = 0

    async def patch(self, changes: dict[str, Any]) -> None:
        changes = {k: v for k, v in changes.items() if self.current.get(k) != v}
        if not changes:
            return
        await self.rt.kube.patch_status(PLURAL, self.namespace, self.name, changes)
        self.patches += 1
        for key, value in changes.items():
            if value is None:
                self.current.pop(key, None)
            else:
                self.current[key] = value

    async def replace(self, new: dict[str, Any]) -> None:
        await self.patch(merge_patch(self.current, new))

    async def progress(self, done: int, total: int | None, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_INTERVAL:
            return
        self._last_progress = now
        await self.patch({"progress": progress_value(done, total)})


def progress_value(done: int, total: int | None) -> dict[str, Any]:
    value: dict[str, Any] = {"bytesDone": done}
    if total:
        value["bytesTotal"] = total
        value["percent"] = min(100, int(done * 100 / total))
    return value


def host_list(hosts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [hosts[k] for k in sorted(hosts)]


def ready_status(status: dict[str, Any], conditions: list[dict[str, Any]], generation: int,
                  hosts: dict[str, dict[str, Any]], targets: list[Target]) -> dict[str, Any]:
    new = {k: v for k, v in status.items() if k not in ("error", "retry")}
    new.update({
        "observedGeneration": generation,
        "phase": "Ready",
        "hosts": host_list(hosts),
        "conditions": summarize(conditions, ready=True, reason="Imported",
                                message=f"available on {len(targets)} host(s)", generation=generation),
    })
    size = status.get("sizeBytes")
    if size:
        new["progress"] = progress_value(size, size)
    return new


async def failed_status(err: AppError, status: dict[str, Any], conditions: list[dict[str, Any]],
                         generation: int, rt: Runtime, hosts: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    ISO_FAILURES.labels(err.reason).inc()
    permanent = not err.retryable or err.context.get("permanent") == "true"
    count = int((status.get("retry") or {}).get("count") or 0) + 1
    retry: dict[str, Any] = {"count": count}
    if not permanent:
        next_at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=retry_delay(count))
        retry["nextRetryTime"] = timestamp(next_at)
    stalled = permanent or count >= rt.settings.iso_retry_limit
    err_status = await error_status(err, status.get("error"), KIND, rt.remediator)
    message = human_message(err, err_status)
    new = dict(status)
    new.update({
        "observedGeneration": generation,
        "phase": "Failed",
        "retry": retry,
        "error": err_status,
        "conditions": summarize(conditions, ready=False, reason=err.reason, message=message,
                                generation=generation, reconciling=not stalled, stalled=stalled),
    })
    if hosts is not None:
        new["hosts"] = host_list(hosts)
    if err.code == ErrorCode.ISO_CHECKSUM_MISMATCH:
        new.pop("progress", None)
    log.warning("ISO import failed", code=err.code.value, error=err.message, attempt=count,
                permanent=permanent, stalled=stalled)
    return new


def due(status: dict[str, Any] | None, generation: int, *, resync_due: bool) -> bool:
    """Whether the timer should run an attempt now."""
    status = status or {}
    if status.get("observedGeneration") != generation:
        return True
    retry = status.get("retry") or {}
    if status.get("error"):
        next_at = retry.get("nextRetryTime")
        if not next_at:
            return False  # permanent: waits for a spec change
        at = parse_time(next_at)
        return at is None or dt.datetime.now(dt.timezone.utc) >= at
    return resync_due

"""LibvirtHost handlers: a periodic probe (timer) that also reacts to spec changes quickly."""

from __future__ import annotations

import datetime as dt
from typing import Any

import kopf

from ..core.api.common import GROUP, VERSION
from ..core.conditions import READY, get_condition
from ..reconcile.failures import parse_time
from ..reconcile.host import reconcile_host
from ..reconcile.status import merge_patch
from .instrument import reconciler
from .startup import runtime_of

TICK_SECONDS = 2.0


def _probe_due(spec: dict[str, Any], status: dict[str, Any], generation: int) -> bool:
    if status.get("observedGeneration") != generation:
        return True
    last = parse_time(status.get("lastProbeTime"))
    interval = float(spec.get("probeIntervalSeconds") or 30)
    return last is None or (dt.datetime.now(dt.timezone.utc) - last).total_seconds() >= interval


@kopf.timer(GROUP, VERSION, "libvirthosts", interval=TICK_SECONDS, initial_delay=0)
@reconciler("libvirthost", "LibvirtHost")
async def probe_host(name: str, spec: dict[str, Any], status: dict[str, Any], meta: dict[str, Any],
                     body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    status = dict(status or {})
    generation = meta.get("generation") or 0
    if not _probe_due(dict(spec), status, generation):
        return
    rt = runtime_of(memo)
    outcome = await reconcile_host(name, dict(spec), status, generation, rt)
    was_ready = (get_condition(status.get("conditions"), READY) or {}).get("status")
    now_ready = (get_condition(outcome.status["conditions"], READY) or {}).get("status")
    if was_ready != now_ready:
        cond = get_condition(outcome.status["conditions"], READY) or {}
        kopf.event(body, type="Normal" if now_ready == "True" else "Warning",
                   reason=cond.get("reason", "Unknown"), message=cond.get("message", ""))
    for key, value in merge_patch(status, outcome.status).items():
        patch.status[key] = value
    if was_ready != now_ready:  # other changes reach the parked VMs through the watch (handlers.vm)
        await memo_hosts_changed(memo)


async def memo_hosts_changed(memo: kopf.Memo) -> None:
    """Wake anything waiting for host changes (e.g. unschedulable VMs)."""
    waiter = memo.get("hosts_changed")
    if waiter is not None:
        waiter.set()


@kopf.on.delete(GROUP, VERSION, "libvirthosts", optional=True)
async def forget_host(name: str, memo: kopf.Memo, **_: Any) -> None:
    await runtime_of(memo).pool.remove(name)

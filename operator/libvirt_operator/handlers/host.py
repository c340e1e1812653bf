"""LibvirtHost handlers: one probe loop per host (a kopf daemon) that writes its own status.

Not a kopf timer: kopf patches a timer's status after every run, and when that patch exhausts its
retries (an apiserver outage of a minute or more) the timer dies for good while the host keeps its
last status (Ready). The loop below survives anything a round can raise: it writes the status
itself, and when the apiserver is away it retries with backoff until it is back. A dropped
connection (libvirt's close callback) wakes it at once and the host turns NotReady immediately.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import kopf

from ..adapters.libvirt import HostConnection
from ..adapters.libvirt.events import deliver
from ..core.api.common import GROUP, VERSION
from ..core.conditions import READY, get_condition
from ..core.logs import get_logger
from ..core.metrics import HOST_READY, forget_host as forget_host_series
from ..reconcile.host import HostOutcome, connection_lost, reconcile_host
from ..reconcile.status import merge_patch
from .events import post_event
from . import observe  # noqa: F401  (registers the scrape-time gauges over the watch caches)
from .instrument import ended_with, reconciler, working
from .startup import runtime_of
from .vm_state import state_of

log = get_logger(__name__)
TICK_SECONDS = 2.0          # how often the loop looks whether a probe is due (spec changes included)
RETRY_CAP_SECONDS = 30.0    # backoff cap while the status cannot be written (apiserver away)


class _HostLoop:
    """What one host's probe loop remembers between rounds (in memory only)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.wake = asyncio.Event()
        self.lost: list[str] = []
        self.probed_generation: int | None = None
        self.next_probe = 0.0           # monotonic time of the next due probe
        self.write_failures = 0
        self.hooked: HostConnection | None = None

    def on_lost(self, reason: str) -> None:  # on the operator's loop (delivered from libvirt's thread)
        self.lost.append(reason)
        self.wake.set()

    def due(self, spec: dict[str, Any], generation: int) -> bool:
        return bool(self.lost) or self.probed_generation != generation or time.monotonic() >= self.next_probe

    def follow(self, conn: HostConnection | None, loop: asyncio.AbstractEventLoop) -> None:
        """Hear about the current pooled connection's loss (the pool replaces it on spec changes)."""
        if conn is self.hooked:
            return
        if self.hooked is not None:
            with contextlib.suppress(ValueError):
                self.hooked.on_lost.remove(self._hook)
        self.hooked = conn
        if conn is not None:
            conn.on_lost.append(self._hook)

    def _hook(self, reason: str) -> None:  # on libvirt's event thread
        if self._loop is not None:
            deliver(self._loop, self.on_lost, reason)

    _loop: asyncio.AbstractEventLoop | None = None


@kopf.daemon(GROUP, VERSION, "libvirthosts", id="probe", cancellation_timeout=1.0)
async def probe_host_loop(name: str, body: kopf.Body, memo: kopf.Memo, stopped: Any, **_: Any) -> None:
    """Probe the host every spec.probeIntervalSeconds (and at once on a spec change or a lost
    connection) until the LibvirtHost is deleted or the operator stops. Never returns early."""
    state = _HostLoop(name)
    state._loop = asyncio.get_running_loop()
    try:
        while not stopped:
            delay = TICK_SECONDS
            try:
                await probe_round(name=name, meta=body.get("metadata") or {}, body=body, memo=memo, state=state)
                state.write_failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001  (the loop must survive anything; apiserver outages)
                state.write_failures += 1
                delay = min(RETRY_CAP_SECONDS, TICK_SECONDS * 2 ** min(state.write_failures - 1, 6))
                log.warning("host probe round failed; retrying", kind="LibvirtHost", name=name,
                            error=str(err)[:300], attempt=state.write_failures, retry_in=delay)
                state.next_probe = 0.0  # whatever was found is written again next round
            state.follow(runtime_of(memo).pool.get(name), state._loop)
            if not state.lost:
                with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                    await asyncio.wait_for(state.wake.wait(), delay)
            state.wake.clear()
    finally:
        state.follow(None, state._loop)


@reconciler("libvirthost", "LibvirtHost", timer=True)
async def probe_round(*, name: str, meta: dict[str, Any], body: kopf.Body, memo: kopf.Memo,
                      state: _HostLoop) -> None:
    spec = dict(body.get("spec") or {})
    status = dict(body.get("status") or {})
    generation = meta.get("generation") or 0
    if not state.due(spec, generation):
        return
    working()
    rt = runtime_of(memo)
    if state.lost:
        reason = state.lost[-1]
        state.lost.clear()
        outcome = await connection_lost(name, reason, status, generation, rt)
        await _write(name, body, status, outcome, memo)
        status = {**status, **outcome.status}
    outcome = await reconcile_host(name, spec, status, generation, rt)
    ended_with(outcome.error)
    await _write(name, body, status, outcome, memo)
    state.probed_generation = generation
    state.next_probe = time.monotonic() + float(spec.get("probeIntervalSeconds") or 30)


async def _write(name: str, body: kopf.Body, status: dict[str, Any], outcome: HostOutcome, memo: kopf.Memo) -> None:
    """Our own status write (raises while the apiserver is away: the loop retries with backoff)."""
    patch = merge_patch(status, outcome.status)
    if patch:
        await runtime_of(memo).kube.patch_status("libvirthosts", None, name, patch)
    was_ready = (get_condition(status.get("conditions"), READY) or {}).get("status")
    now_ready = (get_condition(outcome.status["conditions"], READY) or {}).get("status")
    HOST_READY.labels(name).set(1 if now_ready == "True" else 0)
    if was_ready != now_ready:
        cond = get_condition(outcome.status["conditions"], READY) or {}
        await post_event(runtime_of(memo), body, "Normal" if now_ready == "True" else "Warning",
                         cond.get("reason", "Unknown"), cond.get("message", ""))
        await memo_hosts_changed(memo)  # other changes reach the parked VMs through the watch (handlers.vm)


async def memo_hosts_changed(memo: kopf.Memo) -> None:
    """Wake anything waiting for host changes (e.g. unschedulable VMs)."""
    waiter = memo.get("hosts_changed")
    if waiter is not None:
        waiter.set()


@kopf.on.delete(GROUP, VERSION, "libvirthosts", optional=True)
async def forget_host(name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """No connection to it is opened again until a LibvirtHost of this name exists again (handlers.vm's
    watch_hosts says so). A host re-created under the name (delete + create, e.g. a GitOps replace)
    before this ran owns the pool entry and series now: they stay."""
    rt = runtime_of(memo)
    if state_of(rt).host_replaced(name, body):
        return
    await rt.pool.remove(name, deleted=True)
    forget_host_series(name)

"""Executing VM action requests (reconcile.actions decides; this runs the libvirt steps).

Called from reconcile.vm.sync_vm under the VM's lock, after the domain is defined and before the
power plan, so the plan sees the domain as the action left it. libvirt calls go through the host's
pooled connection (off the event loop); the graceful-shutdown wait polls with asyncio.sleep, holding
no thread. Never raises: a failing step is a Failed lastAction and a Warning Event."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..adapters.libvirt import domains
from ..core.domain import DomainObservation, PowerState
from ..core.errors import AppError
from ..core.logs import get_logger
from ..core.metrics import VM_OPERATIONS
from ..core.timestamps import timestamp
from . import actions
from .actions import ActionRequest, BadRequest, Step

log = get_logger(__name__)
POLL_SECONDS = 0.25
_OFF = (PowerState.SHUTOFF, PowerState.ABSENT, PowerState.CRASHED)

Event = tuple[str, str, str]


@dataclasses.dataclass
class ActionResult:
    observed: DomainObservation
    booted: bool = False        # the domain was (re)started: it runs the current definition
    stopped: bool = False       # the domain was stopped on request


async def _shutdown(conn: Any, uid: str, grace: float) -> DomainObservation:
    """ACPI shutdown, then power off once `grace` seconds have passed."""
    observed = await conn.call("shutdown", lambda c: domains.shutdown(c, uid))
    deadline = time.monotonic() + grace
    while observed.state not in _OFF and time.monotonic() < deadline:
        await asyncio.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        observed = await conn.call("domain_state", lambda c: domains.state(c, uid))
    if observed.state not in _OFF:
        observed = await conn.call("destroy", lambda c: domains.destroy(c, uid))
    return observed


async def _step(step: Step, conn: Any, uid: str, grace: float) -> DomainObservation:
    if step is Step.START:
        return await conn.call("start", lambda c: domains.start(c, uid))
    if step is Step.SHUTDOWN:
        return await _shutdown(conn, uid, grace)
    if step is Step.DESTROY:
        return await conn.call("destroy", lambda c: domains.destroy(c, uid))
    if step is Step.SUSPEND:
        return await conn.call("suspend", lambda c: domains.suspend(c, uid))
    return await conn.call("resume", lambda c: domains.resume(c, uid))


_OPERATION = {Step.START: "start", Step.SHUTDOWN: "stop", Step.DESTROY: "stop", Step.SUSPEND: "pause",
              Step.RESUME: "unpause"}


async def execute(request: ActionRequest | BadRequest, run_strategy: str, grace: float, observed: DomainObservation,
                  conn: Any, uid: str, status: dict[str, Any], events: list[Event], now: dt.datetime,
                  write_pending: Callable[[dict[str, Any]], Awaitable[None]] | None = None) -> ActionResult:
    """Run one request; records status.lastAction (and the power bookkeeping) in `status`."""
    result = ActionResult(observed)
    if isinstance(request, BadRequest):
        status["lastAction"] = actions.last_action(request, "Failed", request.message, now)
        events.append(("Warning", "ActionRejected", request.message))
        log.info("VM action request rejected", request_id=request.id, reason=request.message)
        return result
    decision = actions.plan_action(request.action, run_strategy, observed.state)
    who = f" (requested by {request.requested_by})" if request.requested_by else ""
    if decision.steps and write_pending is not None and any(s is Step.SHUTDOWN for s in decision.steps):
        # A graceful shutdown may take the grace period: show the request is being worked on.
        try:
            await write_pending({"lastAction": actions.last_action(request, "Pending", f"{request.action} in progress",
                                                                   now)})
        except AppError as err:
            log.info("recording the pending action failed", request_id=request.id, code=err.code.value)
    try:
        for step in decision.steps:
            result.observed = await _step(step, conn, uid, grace)
            VM_OPERATIONS.labels(_OPERATION[step]).inc()
            if step is Step.START:
                result.booted = True
            elif step in (Step.SHUTDOWN, Step.DESTROY):
                result.stopped = True
    except AppError as err:
        message = f"{request.action} failed: {err.message}"
        status["lastAction"] = actions.last_action(request, "Failed", message, now)
        events.append(("Warning", "ActionFailed", f"{message}{who}"))
        log.info("VM action failed", request_id=request.id, action=request.action, code=err.code.value)
        _bookkeep(result, status, now)
        return result
    status["lastAction"] = actions.last_action(request, decision.phase, decision.message, now)
    if decision.refused:
        events.append(("Warning", "ActionRefused", f"{request.action} refused: {decision.message}{who}"))
    else:
        events.append(("Normal", "ActionSucceeded", f"{request.action}: {decision.message}{who}"))
    log.info("VM action done", request_id=request.id, action=request.action, phase=decision.phase)
    _bookkeep(result, status, now)
    return result


def _bookkeep(result: ActionResult, status: dict[str, Any], now: dt.datetime) -> None:
    """The power fields the plan reads: a stop on request is not a failure, a start is a new run."""
    if result.booted and result.observed.state not in _OFF:
        status["lastStartTime"] = timestamp(now)
        status.setdefault("firstBootTime", timestamp(now))
        status.pop("stopRequestedTime", None)
        status.pop("startFailure", None)  # started on request: the crash-loop record no longer applies
    elif result.stopped:
        status["stopRequestedTime"] = timestamp(now)

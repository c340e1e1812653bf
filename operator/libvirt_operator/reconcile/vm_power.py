"""Power-state plumbing of the VM reconcile around reconcile.plan.plan_power: the run bookkeeping
in status (boot/start/stop times, start failure), carrying out a planned action, telling a crash."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from ..adapters.libvirt import domains
from ..adapters.libvirt.errors import classify_libvirt_error
from ..core.api.vm import StartFailure
from ..core.conditions import timestamp
from ..core.domain import DomainObservation, PowerState, StopCause
from ..core.errors import ErrorCode
from ..core.timestamps import parse_time as _time
from . import actions, plan

NOT_GUEST_FAULT = {ErrorCode.HOST_UNREACHABLE, ErrorCode.HOST_AUTH_FAILED, ErrorCode.LIBVIRT_TIMEOUT,
                    ErrorCode.HOST_NOT_FOUND}
OPERATION_METRIC = {plan.Action.START: "start", plan.Action.SHUTDOWN: "stop", plan.Action.DESTROY: "stop"}


def read_power_status(status: Mapping[str, Any]) -> plan.PowerStatus:
    failure = status.get("startFailure")
    return plan.PowerStatus(
        first_boot_time=_time(status.get("firstBootTime")),
        last_start_time=_time(status.get("lastStartTime")),
        stop_requested_time=_time(status.get("stopRequestedTime")),
        start_failure=StartFailure.model_validate(failure) if failure else None,
    )


def write_power_status(status: dict[str, Any], power: plan.PowerStatus) -> None:
    for key, value in (("firstBootTime", power.first_boot_time), ("lastStartTime", power.last_start_time),
                       ("stopRequestedTime", power.stop_requested_time)):
        if value is None:
            status.pop(key, None)
        else:
            status[key] = timestamp(value)
    if power.start_failure is None:
        status.pop("startFailure", None)
    else:
        status["startFailure"] = power.start_failure.to_wire()


def is_crashed(observed: DomainObservation) -> bool:
    """libvirt says the domain died, not that it was shut down or powered off: state crashed, or shut
    off with reason crashed/failed (QEMU killed, crashed, or failed to start)."""
    return observed.state is PowerState.CRASHED or (
        observed.state is PowerState.SHUTOFF and observed.stop_cause is StopCause.FAILURE)


NEW_DOMAIN = DomainObservation(PowerState.SHUTOFF)  # what a define that made the domain returns


def starts_when_defined(run_strategy: str, status: Mapping[str, Any], now: dt.datetime, grace: float) -> bool:
    """Whether the plan of this pass starts a domain defined just now (shut off, never booted): then
    the define asks for the boot too, in the same call (`domains.define(boot=True)`). Same inputs as
    the plan after the define, so both agree; a define that finds anything else boots nothing."""
    if actions.held_stopped(run_strategy, status.get("lastAction"), NEW_DOMAIN.state):
        return False
    return plan.plan_power(run_strategy, NEW_DOMAIN, read_power_status(status), now, grace).action \
        is plan.Action.START


async def act(action: plan.Action, conn: Any, uid: str, booted: domains.Booted | None = None) -> DomainObservation:
    if action is plan.Action.START:
        if booted is not None:  # the define of this pass booted it already: its outcome is the start's
            if booted.error is not None:
                raise classify_libvirt_error(booted.error, host=conn.name, operation="start")
            assert booted.observation is not None
            return booted.observation
        return await conn.call("start", lambda c: domains.start(c, uid))
    if action is plan.Action.SHUTDOWN:
        return await conn.call("shutdown", lambda c: domains.shutdown(c, uid))
    return await conn.call("destroy", lambda c: domains.destroy(c, uid))

"""A VM's status where the reconcile cannot go on: a failed or waiting reconcile (error, conditions,
printable status, the Event that says why), a host that refuses the VM (tenancy), a host that
cannot be asked, a domain name another domain holds; and the Events a change of printable status
deserves."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.api.vm import StartFailure
from ..core.conditions import get_condition, now as utcnow, set_condition, summarize
from ..core.domain import DomainObservation, Owner, PowerState
from ..core.errors import AppError, ErrorCode
from ..core.timestamps import parse_time as _time
from . import plan
from .failures import error_status, human_message
from .runtime import Runtime
from .vm_types import ClusterView, Event, VmOutcome, Stage

SCHEDULED, RESTART_REQUIRED = "Scheduled", "RestartRequired"
# A host refusing the VM (LibvirtHost tenancy fields): not retried on a timer, re-checked when a host
# or a namespace changes.
TENANCY_CODES = {ErrorCode.NAMESPACE_NOT_ALLOWED, ErrorCode.POOL_NOT_ALLOWED, ErrorCode.NETWORK_NOT_ALLOWED}


def refused_error(err: AppError, observed: DomainObservation) -> AppError:
    if observed.active:
        left = ("the running domain is left running (the operator never stops a VM for this); it will not be "
                "restarted or redefined until the host admits it again")
    elif observed.exists:
        left = "the domain stays stopped: it is not started or redefined until the host admits it again"
    else:
        left = "no domain is created until the host admits it again"
    return AppError(err.code, f"{err.message}; {left}", err.context)


def _refused_printable(observed: DomainObservation) -> str:
    if observed.state is PowerState.RUNNING:
        return "Running"
    if observed.state is PowerState.PAUSED:
        return "Paused"
    if observed.state is PowerState.SHUTTING_DOWN:
        return "Stopping"
    return "Stopped" if observed.exists else "ErrorUnschedulable"


def transition_events(old: Mapping[str, Any], new: Mapping[str, Any], events: list[Event]) -> None:
    before, after = old.get("printableStatus"), new.get("printableStatus")
    if before == after:
        return
    if after == "CrashLoopBackOff":
        events.append(("Warning", "CrashLoopBackOff",
                       (get_condition(new.get("conditions"), "Ready") or {}).get("message", "")))
    elif after in ("Running", "Stopped") and not any(e[1] in ("Started", "Stopped") for e in events):
        events.append(("Normal", after, f"the domain is {after.lower()}"))


async def failed_outcome(err: AppError, old_status: Mapping[str, Any], status: dict[str, Any], generation: int,
                  stage: Stage, rt: Runtime, events: list[Event]) -> VmOutcome:
    err_status = await error_status(err, old_status.get("error"), "VirtualMachine", rt.remediator)
    message = human_message(err, err_status)
    conditions = list(status.get("conditions") or [])
    scheduling = not stage.placed
    crash_loop = stage.start_failed and plan.crash_looping_stalled(
        StartFailure.model_validate(status["startFailure"]) if status.get("startFailure") else None)
    if scheduling:
        conditions = set_condition(conditions, SCHEDULED, False, err.reason, message, generation)
    conditions = summarize(conditions, ready=False, reason=err.reason, message=message, generation=generation,
                           reconciling=err.retryable and not crash_loop, stalled=not err.retryable or crash_loop)
    status["conditions"] = conditions
    status["error"] = err_status
    status["observedGeneration"] = generation
    requeue = None
    if stage.refused is not None:
        status["printableStatus"] = _refused_printable(stage.refused)
    elif stage.start_failed:
        status["printableStatus"] = "CrashLoopBackOff"
        retry_after = _time((status.get("startFailure") or {}).get("retryAfter"))
        if retry_after is not None:
            requeue = max(0.5, (retry_after - utcnow()).total_seconds())
    else:
        status["printableStatus"] = plan.printable_status(
            unschedulable=scheduling, waiting_for_media=stage.waiting_media,
            host_unknown=err.code in (ErrorCode.HOST_UNREACHABLE, ErrorCode.HOST_NOT_FOUND, ErrorCode.LIBVIRT_TIMEOUT,
                                      ErrorCode.HOST_OUT_OF_SERVICE),
            provisioning=True)
    previous_code = (old_status.get("error") or {}).get("code")
    if previous_code != err.code.value and not stage.start_failed:
        waiting = _waiting_reason(err, stage)
        events.append(("Normal", waiting, message) if waiting else ("Warning", err.reason, message))
    return VmOutcome(status, events, err, requeue)


def started_event(events: list[Event], dname: str, host: str) -> None:
    """A start, with the placement and the define of the same pass folded in: one Event says all
    (`kubectl describe` reads the same, and each Event is one more write to the API server: 2,000
    fewer in a 1,000-VM burst)."""
    placed_now = [e for e in events if e[1] == "Scheduled"]
    defined_now = [e for e in events if e[1] == "Defined"]
    for e in placed_now + defined_now:
        events.remove(e)
    started = f"domain {dname} {'defined and ' if defined_now else ''}started"
    events.append(("Normal", "Started", f"placed on LibvirtHost {host}; {started}" if placed_now
                   else f"{started} on {host}"))


def _waiting_reason(err: AppError, stage: Stage) -> str | None:
    """Expected waiting is not a warning: objects applied together (GitOps) arrive in any order, an
    image takes a while to import, a new host a probe to turn Ready. The status still says why."""
    if err.code is ErrorCode.ISO_NOT_FOUND and stage.waiting_media:
        return "WaitingForMedia"
    if not stage.placed and err.code in (ErrorCode.NO_SCHEDULABLE_HOST, ErrorCode.HOST_NOT_FOUND):
        return "WaitingForHost"
    return None


def host_lost_status(body: Mapping[str, Any], err: AppError, error_state: dict[str, Any]) -> dict[str, Any]:
    """Status of a VM whose host cannot be asked (resync failed): power state Unknown, Ready=False.
    The placement and run bookkeeping stay as they were."""
    meta = body.get("metadata") or {}
    generation = int(meta.get("generation") or 0)
    status = dict(body.get("status") or {})
    message = human_message(err, error_state)
    status["conditions"] = summarize(status.get("conditions") or [], ready=False, reason=err.reason,
                                     message=message, generation=generation, reconciling=True)
    status["printableStatus"] = "Unknown"
    status["error"] = error_state
    return status


def name_conflict(dname: str, host: str, uuid: str, owner: Owner | None, view: ClusterView) -> AppError:
    """A domain with our name but another UUID: never adopted, redefined or deleted; say whose it is."""
    if owner is None:
        whose = "not managed by this operator"
    else:
        live = any((vm.get("metadata") or {}).get("uid") == owner.uid for vm in view.vms())
        whose = (f"it belongs to VirtualMachine {owner.namespace}/{owner.name} (uid {owner.uid})"
                 + ("" if live else ", which this operator does not see (deleted, or in a namespace it does "
                    "not watch)"))
    return AppError(ErrorCode.LIBVIRT_ERROR,
                    f"a domain named {dname} with UUID {uuid} already exists on {host}, {whose}; it is left "
                    "untouched. Remove or rename it on the host (virsh undefine) and the VM will be created",
                    {"host": host, "domain": dname, "uuid": uuid})

"""VM actions (start, stop, restart, pause, unpause) requested through an annotation: pure planning.

A request is the annotation `virt.libvirt-operator.io/action-request` holding JSON
`{"action": "restart", "id": "<uuid>", "requestedAt": "...", "requestedBy": "..."}`. It is never a
`spec` field (a Git repository owns spec), and the operator never edits or removes the annotation:
it executes each request id once and records the outcome in `status.lastAction` (plus an Event).
A request whose id equals `status.lastAction.id` is done, whatever its outcome.

Semantics per runStrategy (the spec stays the source of truth; an action never overrides it):

* start   — Halted: refused (set runStrategy in Git). Otherwise a stopped domain is started (a
            crashed one is powered off first); a running one: nothing to do.
* stop    — Always: refused (Always restarts whatever stops; set runStrategy Halted or Manual in Git).
            Otherwise graceful shutdown, powered off after terminationGracePeriodSeconds; a paused
            domain is powered off at once. Under RerunOnFailure a stopped-on-request VM stays stopped
            until a start request (or a runStrategy change); Manual and Once leave it off anyway.
* restart — a fresh boot: graceful shutdown with the same deadline, power off if it is not down by
            then, start. A fresh boot (not an in-guest reboot) is what applies a changed definition,
            so it clears RestartRequired. Refused on Halted and on a stopped VM (use start).
* pause / unpause — libvirt suspend / resume; printableStatus shows Paused. Only on a running
            (resp. paused) domain.

Pure: no kopf, no libvirt, no I/O (checked by import-linter with reconcile.plan)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from ..core.api.common import GROUP
from ..core.api.vm import ACTIONS
from ..core.domain import PowerState
from ..core.timestamps import timestamp

ACTION_REQUEST_ANNOTATION = f"{GROUP}/action-request"
MAX_REQUEST_BYTES = 4096
MAX_ID_LENGTH = 128


@dataclasses.dataclass(frozen=True)
class ActionRequest:
    id: str
    action: str
    requested_by: str | None = None
    requested_at: str | None = None


@dataclasses.dataclass(frozen=True)
class BadRequest:
    """An annotation that is not a valid request: reported once (keyed by its content)."""

    id: str
    message: str
    action: str | None = None


def _bad_id(raw: str) -> str:
    return "invalid-" + hashlib.sha256(raw.encode("utf-8", "replace")).hexdigest()[:16]


def parse_request(raw: str | None) -> ActionRequest | BadRequest | None:
    """The annotation's request; None when there is none."""
    if raw is None or not raw.strip():
        return None
    if len(raw) > MAX_REQUEST_BYTES:
        return BadRequest(_bad_id(raw), f"the {ACTION_REQUEST_ANNOTATION} annotation is longer than "
                                        f"{MAX_REQUEST_BYTES} bytes")
    try:
        data = json.loads(raw)
    except ValueError as err:
        return BadRequest(_bad_id(raw), f"the {ACTION_REQUEST_ANNOTATION} annotation is not JSON ({err.msg}); "
                                        'expected {"action": "restart", "id": "<uuid>"}')
    if not isinstance(data, dict):
        return BadRequest(_bad_id(raw), f"the {ACTION_REQUEST_ANNOTATION} annotation must be a JSON object "
                                        'like {"action": "restart", "id": "<uuid>"}')
    rid, action = data.get("id"), data.get("action")
    if not isinstance(rid, str) or not rid.strip() or len(rid) > MAX_ID_LENGTH:
        return BadRequest(_bad_id(raw), f"the action request needs an \"id\" (a string of 1 to {MAX_ID_LENGTH} "
                                        "characters, e.g. a UUID)", action if isinstance(action, str) else None)
    if action is None:
        return BadRequest(rid, f"the action request needs an \"action\": one of {', '.join(ACTIONS)}")
    if action not in ACTIONS:
        return BadRequest(rid, f"unknown action {str(action)[:40]!r}: expected one of {', '.join(ACTIONS)}",
                          str(action)[:40] if action is not None else None)
    by, at = data.get("requestedBy"), data.get("requestedAt")
    return ActionRequest(rid, action, str(by)[:253] if by is not None else None,
                         str(at)[:64] if at is not None else None)


def pending_request(annotations: Mapping[str, str] | None,
                    last_action: Mapping[str, Any] | None) -> ActionRequest | BadRequest | None:
    """The request still to act on: the annotation's, unless status.lastAction already has its id
    in a final phase (executed or refused once, never again)."""
    request = parse_request((annotations or {}).get(ACTION_REQUEST_ANNOTATION))
    if request is None:
        return None
    last = last_action or {}
    if last.get("id") == request.id and last.get("phase") in ("Succeeded", "Failed"):
        return None
    return request


class Step(str, enum.Enum):
    START = "start"
    SHUTDOWN = "shutdown"      # graceful (ACPI), then power off after the grace period
    DESTROY = "destroy"        # power off now
    SUSPEND = "suspend"
    RESUME = "resume"


@dataclasses.dataclass(frozen=True)
class ActionPlan:
    steps: tuple[Step, ...]      # empty: nothing to execute
    phase: str                   # the outcome when the steps succeed: Succeeded, or Failed (refused)
    message: str

    @property
    def refused(self) -> bool:
        return self.phase == "Failed"


_OFF = (PowerState.SHUTOFF, PowerState.ABSENT, PowerState.CRASHED)
_UP = (PowerState.RUNNING, PowerState.SHUTTING_DOWN)


def plan_action(action: str, run_strategy: str, state: PowerState) -> ActionPlan:
    """What an action does to a domain in `state` under `run_strategy`."""
    def ok(message: str, *steps: Step) -> ActionPlan:
        return ActionPlan(tuple(steps), "Succeeded", message)

    def refuse(message: str) -> ActionPlan:
        return ActionPlan((), "Failed", message)

    if state is PowerState.UNKNOWN:
        return refuse("libvirt reports an unknown domain state; try again once the host answers")
    if action == "start":
        if run_strategy == "Halted":
            return refuse("runStrategy Halted keeps the VM stopped: set spec.runStrategy to Manual (or Always) "
                          "in Git to start it")
        if state is PowerState.RUNNING:
            return ok("the VM is already running")
        if state is PowerState.PAUSED:
            return refuse("the VM is paused: use unpause")
        if state is PowerState.SHUTTING_DOWN:
            return refuse("the guest is shutting down: request start again once it is stopped")
        if state is PowerState.CRASHED:
            return ok("started (the crashed domain was powered off first)", Step.DESTROY, Step.START)
        return ok("started", Step.START)
    if action == "stop":
        if run_strategy == "Always":
            return refuse("runStrategy Always restarts the VM whenever it stops: set spec.runStrategy to Halted "
                          "(or Manual) in Git to stop it")
        if state in _OFF:
            return ok("the VM is already stopped")
        if state is PowerState.PAUSED:
            return ok("stopped (the paused domain was powered off)", Step.DESTROY)
        return ok("stopped", Step.SHUTDOWN)
    if action == "restart":
        if run_strategy == "Halted":
            return refuse("runStrategy Halted keeps the VM stopped: set spec.runStrategy in Git to run it")
        if state in _OFF:
            return refuse("the VM is not running: use start")
        if state is PowerState.PAUSED:
            return ok("restarted (the paused domain was powered off and started)", Step.DESTROY, Step.START)
        return ok("restarted", Step.SHUTDOWN, Step.START)
    if action == "pause":
        if state is PowerState.PAUSED:
            return ok("the VM is already paused")
        if state in _UP:
            return ok("paused", Step.SUSPEND)
        return refuse("the VM is not running: nothing to pause")
    if action == "unpause":
        if state is PowerState.PAUSED:
            return ok("unpaused", Step.RESUME)
        if state in _UP:
            return ok("the VM is not paused")
        return refuse("the VM is not running: nothing to unpause")
    return refuse(f"unknown action {action!r}")


def held_stopped(run_strategy: str, last_action: Mapping[str, Any] | None, state: PowerState) -> bool:
    """A RerunOnFailure VM stopped by a stop request stays stopped (its power-off is not a failure to
    rerun) until another action or a runStrategy change. Other strategies need no help: Always refuses
    stop, Halted is off anyway, Manual and Once never restart a stopped VM by themselves."""
    last = last_action or {}
    return (run_strategy == "RerunOnFailure" and state in _OFF and last.get("action") == "stop"
            and last.get("phase") == "Succeeded")


def last_action(request: ActionRequest | BadRequest, phase: str, message: str, now: dt.datetime) -> dict[str, Any]:
    """status.lastAction for a request (wire form)."""
    # Every key, None when unknown: status is merge-patched, so a missing key would keep the last
    # request's value.
    return {"id": request.id, "action": request.action or None, "phase": phase, "message": message,
            "requestedBy": request.requested_by if isinstance(request, ActionRequest) else None,
            "time": timestamp(now)}


def new_request(action: str, request_id: str, requested_by: str | None, now: dt.datetime) -> str:
    """The annotation value the CLI writes."""
    body: dict[str, Any] = {"action": action, "id": request_id,
                            "requestedAt": timestamp(now)}
    if requested_by:
        body["requestedBy"] = requested_by
    return json.dumps(body, separators=(",", ":"))

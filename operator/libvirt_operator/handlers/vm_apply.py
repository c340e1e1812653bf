"""Applying a VM reconcile's outcome: the status (patched only when it changed), its Events, and
what happens next (parked until a watch event, requeued with backoff, or a host-round deadline)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import kopf

from ..core.errors import ErrorCode
from ..reconcile import actions
from ..reconcile.runtime import Runtime
from ..reconcile.status import merge_patch
from ..reconcile.vm_status import TENANCY_CODES
from ..reconcile.vm_types import VmOutcome
from .instrument import ended_with
from .vm_state import BUSY_RETRY_SECONDS, PLURAL, VmState


def action_request(vm: Mapping[str, Any] | None) -> str | None:
    return (((vm or {}).get("metadata") or {}).get("annotations") or {}).get(actions.ACTION_REQUEST_ANNOTATION)


def _action_pending(vm: Mapping[str, Any] | None, status: Mapping[str, Any]) -> bool:
    """The VM carries an action request that `status` does not show as executed or refused."""
    if vm is None:
        return False
    return actions.pending_request((vm.get("metadata") or {}).get("annotations"), status.get("lastAction")) is not None


async def apply_outcome(rt: Runtime, st: VmState, vm: dict[str, Any], outcome: VmOutcome) -> None:
    """The outcome of the VM's work item, which also decides when the key runs next."""
    meta = vm["metadata"]
    uid = meta["uid"]
    ended_with(outcome.error, outcome.requeue_after)  # the reconcile's result, when one runs this
    patch = merge_patch(vm.get("status") or {}, outcome.status)
    if patch:
        # The server's answer, not outcome.status: it also holds what others wrote since the run began.
        st.remember(await rt.kube.patch_status(PLURAL, meta["namespace"], meta["name"], patch))
    for type_, reason, message in outcome.events:
        kopf.event(vm, type=type_, reason=reason, message=message)
    error = outcome.error
    if error is not None and (error.code in WAITING_CODES and error.retryable or error.code in TENANCY_CODES):
        st.parked[uid] = error.code  # re-checked at once when a host, an ISOImage or a namespace changes
    else:
        st.parked.pop(uid, None)
    retry = error is not None and (error.retryable or error.code in TENANCY_CODES)
    if retry:
        st.retry.failed(uid)  # the queue runs the full reconcile again after the backoff
    elif action_request(st.vms.get(uid)) != action_request(vm):
        # An action request came in while this reconcile ran on the older object: run again.
        st.retry.schedule(uid, 0)
    elif _action_pending(st.vms.get(uid), outcome.status):
        st.retry.schedule(uid, BUSY_RETRY_SECONDS)
    else:
        st.retry.done(uid)
    if outcome.requeue_after is not None:
        st.requeue[uid] = time.monotonic() + outcome.requeue_after
        st.wake_host(outcome.status.get("host"))
    else:
        st.requeue.pop(uid, None)


WAITING_CODES = {ErrorCode.NO_SCHEDULABLE_HOST, ErrorCode.INSUFFICIENT_RESOURCES, ErrorCode.ISO_NOT_FOUND,
                 ErrorCode.HOST_NOT_FOUND, ErrorCode.HOST_UNREACHABLE, ErrorCode.HOST_OUT_OF_SERVICE}

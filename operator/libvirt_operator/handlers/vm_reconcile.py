"""The VM controller's one work item: `reconcile_vm(uid)`, run by the VM work queue (`VmState.retry`)
and by nothing else. Whatever should make a VM be looked at (its watch event, a host or ISOImage
change, a finished migration or restore, a host round's look at the domains) only adds its key to
the queue.

One run: read the cached object; deleting → tear down (`vm_teardown.tear_down`); else make sure our
finalizer holds the object before anything exists on a host, run `reconcile.vm.sync_vm` and apply
its outcome (status, Events, and when the key runs next: `vm_apply.apply_outcome`). A host round's
sighting of the domain, when still fresh (`VmState.fresh`), stands in for asking the host: the run
then only refreshes the power state (or, if the host could not be listed, reports it Unknown)."""

from __future__ import annotations

from typing import Any

from ..core.errors import AppError
from ..core.logs import get_logger
from ..reconcile.failures import error_status, human_message
from ..reconcile.runtime import Runtime
from ..reconcile.vm import sync_vm
from ..reconcile.vm_status import host_lost_status
from ..reconcile.vm_types import VmOutcome
from .instrument import ended_with, reconciler
from .teardown import TEARDOWN_FINALIZER
from .vm_apply import apply_outcome
from .vm_state import BUSY_RETRY_SECONDS, PLURAL, VmState, load_hosts, vm_log_fields
from .vm_teardown import tear_down, vm_held_for_teardown

log = get_logger(__name__)


@reconciler("virtualmachine", "VirtualMachine")
async def reconcile_vm(rt: Runtime, st: VmState, uid: str) -> None:
    sighting = st.sightings.pop(uid, None)  # used by this run or by none
    vm = st.vms.get(uid)
    if vm is not None and vm_held_for_teardown(vm):
        await tear_down(rt, st, uid)
        return
    if vm is None or vm["metadata"].get("deletionTimestamp"):
        st.parked.pop(uid, None)
        st.retry.done(uid)  # gone, or deleted before anything was created (no finalizer of ours)
        return
    lock = st.lock(uid)
    if lock.locked():  # a migration, a snapshot or an address refresh holds it: look again shortly
        st.retry.schedule(uid, BUSY_RETRY_SECONDS)
        return
    await load_hosts(rt, st)
    async with lock:
        vm = st.vms.get(uid)
        if vm is None or vm["metadata"].get("deletionTimestamp"):
            st.retry.add(uid)  # the deletion is the next run's
            return
        try:
            if not await _held(rt, st, vm):
                return  # gone or being deleted meanwhile: its watch event queues it again
            sighting = st.fresh(uid, vm, sighting)
            if sighting is not None and sighting.error is not None:
                outcome = await _host_lost(rt, vm, sighting.error)
            else:
                outcome = await sync_vm(vm, rt, st.view(rt), observed=sighting.domain if sighting else None)
            await apply_outcome(rt, st, vm, outcome)
        except AppError as err:  # e.g. the status patch failed: back off and try again
            log.info("VM reconcile failed", **vm_log_fields(vm), code=err.code.value, error=err.message)
            ended_with(err)
            st.retry.failed(uid)


async def _held(rt: Runtime, st: VmState, vm: dict[str, Any]) -> bool:
    """Our finalizer is on the object before anything is placed or created for it, so a deletion
    always finds its teardown to run. Raises (back off) when it cannot be added yet."""
    meta = vm["metadata"]
    if TEARDOWN_FINALIZER in (meta.get("finalizers") or []):
        return True
    written = await rt.kube.ensure_finalizer(PLURAL, meta["namespace"], meta["name"], TEARDOWN_FINALIZER, known=vm)
    if written is None:
        return False
    fresh = written.get("metadata") or {}
    meta["finalizers"] = list(fresh.get("finalizers") or [])
    meta["resourceVersion"] = fresh.get("resourceVersion")  # the placement write's precondition
    return True


async def _host_lost(rt: Runtime, vm: dict[str, Any], err: AppError) -> VmOutcome:
    """The VM's host could not be listed: power state Unknown, Ready=False, placement kept. No error
    of the run: nothing is retried until the host answers again (its next round queues the VM)."""
    previous = (vm.get("status") or {}).get("error")
    err_state = await error_status(err, previous, "VirtualMachine", rt.remediator)
    events = [] if (previous or {}).get("code") == err.code.value else [
        ("Warning", err.reason, human_message(err, err_state))]
    return VmOutcome(host_lost_status(vm, err, err_state), events, None, None)

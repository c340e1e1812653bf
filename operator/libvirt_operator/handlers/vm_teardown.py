"""A deleted VM's teardown, as the VM's work item: the domain and volumes the operator created go,
then the teardown finalizer (ours: the only one on a VirtualMachine). Blocked (its host is gone or
unreachable): the status says so and the queue tries again, woken by host changes and by the
force-release annotation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from ..core.errors import AppError, ErrorCode
from ..core.logs import get_logger
from ..reconcile.runtime import Runtime
from ..reconcile.status import merge_patch
from ..reconcile.vm_delete import delete_vm
from .teardown import TEARDOWN_FINALIZER
from .vm_state import BUSY_RETRY_SECONDS, PLURAL, VmState, load_hosts, vm_log_fields

log = get_logger(__name__)
DELETE_RETRY_CAP_SECONDS = 10.0  # so a force-release annotation is honoured quickly


async def teardown_vm(rt: Runtime, st: VmState, vm: dict[str, Any]) -> bool:
    """One teardown attempt (the caller holds the VM's lock); True when the VM may go."""
    meta = vm["metadata"]
    uid = meta["uid"]
    outcome = await delete_vm(vm, rt, st.view())
    for type_, reason, message in outcome.events:
        kopf.event(vm, type=type_, reason=reason, message=message)
    if outcome.released:
        st.requeue.pop(uid, None)
        st.parked.pop(uid, None)
        st.retry.done(uid)
        return True
    if outcome.status is not None:
        patch = merge_patch(vm.get("status") or {}, outcome.status)
        if patch:
            await rt.kube.patch_status(PLURAL, meta["namespace"], meta["name"], patch)
            vm["status"] = outcome.status
    st.index(uid)
    st.parked[uid] = outcome.error.code if outcome.error else ErrorCode.HOST_UNREACHABLE
    st.retry.failed(uid, at_most=DELETE_RETRY_CAP_SECONDS)
    return False


def vm_held_for_teardown(vm: Mapping[str, Any]) -> bool:
    """Deleting, and our finalizer still holds it: the teardown is the queue's to run."""
    meta = vm.get("metadata") or {}
    return bool(meta.get("deletionTimestamp")) and TEARDOWN_FINALIZER in (meta.get("finalizers") or [])


async def tear_down(rt: Runtime, st: VmState, uid: str) -> None:
    lock = st.lock(uid)
    if lock.locked():
        st.retry.schedule(uid, BUSY_RETRY_SECONDS)
        return
    await load_hosts(rt, st)  # an unplaced VM's teardown searches every known host
    async with lock:
        vm = st.vms.get(uid)
        if vm is None or not vm_held_for_teardown(vm):
            return
        meta = vm["metadata"]
        try:
            if await teardown_vm(rt, st, vm):
                await rt.kube.remove_finalizer(PLURAL, meta["namespace"], meta["name"], TEARDOWN_FINALIZER,
                                               seen=meta.get("finalizers") or [])
        except AppError as err:
            log.info("VM teardown failed", **vm_log_fields(vm), code=err.code.value, error=err.message)
            st.retry.failed(uid, at_most=DELETE_RETRY_CAP_SECONDS)

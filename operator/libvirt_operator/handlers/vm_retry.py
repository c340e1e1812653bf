"""Waiting VMs: one requeue loop (backoff) + wake-ups from watch events."""

from __future__ import annotations

import asyncio

from ..core.errors import AppError, ErrorCode
from ..core.logs import get_logger
from ..reconcile.runtime import Runtime
from ..reconcile.vm import sync_vm
from .instrument import ended_with, reconciler
from .vm_apply import apply_outcome
from .vm_state import BUSY_RETRY_SECONDS, VmState, load_hosts, vm_log_fields
from .vm_teardown import vm_held_for_teardown, retry_teardown

log = get_logger(__name__)
WAKE_DEBOUNCE_SECONDS = 0.2            # a burst of host/ISO events wakes the parked VMs once


@reconciler("virtualmachine", "VirtualMachine")  # a requeued reconcile is a reconcile
async def retry_one(rt: Runtime, st: VmState, uid: str) -> None:
    """A due VM: the same sync path as the handler (sync_vm + apply_outcome, under the VM's lock)."""
    vm = st.vms.get(uid)
    if vm is not None and vm_held_for_teardown(vm):
        await retry_teardown(rt, st, uid)
        return
    if vm is None or vm["metadata"].get("deletionTimestamp"):
        st.parked.pop(uid, None)
        st.retry.done(uid)
        return
    lock = st.lock(uid)
    if lock.locked():  # a handler or the host's round is on it; look again shortly unless it decides
        st.retry.schedule(uid, BUSY_RETRY_SECONDS)
        return
    await load_hosts(rt, st)
    async with lock:
        vm = st.vms.get(uid)
        if vm is None or vm["metadata"].get("deletionTimestamp"):
            return
        try:
            outcome = await sync_vm(vm, rt, st.view(rt))
            await apply_outcome(rt, st, vm, outcome)
        except AppError as err:  # e.g. the status patch failed: back off and try again
            log.info("requeued VM reconcile failed", **vm_log_fields(vm), code=err.code.value, error=err.message)
            ended_with(err)
            st.retry.failed(uid)


async def wake_loop(st: VmState) -> None:
    """Host/namespace changes wake every parked VM, ISOImage changes those waiting for media (debounced)."""
    while True:
        waits = {asyncio.ensure_future(st.parked_wake.wait()), asyncio.ensure_future(st.media_wake.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        await asyncio.sleep(WAKE_DEBOUNCE_SECONDS)
        everything = st.parked_wake.is_set()
        st.parked_wake.clear()
        st.media_wake.clear()
        st.retry.wake([uid for uid, code in st.parked.items()
                       if everything or code is ErrorCode.ISO_NOT_FOUND])

"""VirtualMachine controller: what makes a VM be looked at. Every trigger only adds the VM's key
(its uid) to the VM work queue (`VmState.retry`, handlers.requeue); the queue runs the one work item
(handlers.vm_reconcile.reconcile_vm) for due keys, one worker per key, with per-key backoff.

Triggers: a VM watch event that needs a reconcile (first seen, spec generation, deletion, annotations:
action request, force-release); a host's spec/readiness/labels change or an ISOImage change wakes the
VMs waiting on them (debounced, `wake_loop`); an out-of-service host queues its VMs. kopf is the event
source (`@kopf.on.event`), runs the per-host daemons (handlers.vm_hosts: one bulk look at a host's
domains after lifecycle events and periodically, which queues the VMs with what it saw; the orphan
check) and owns liveness; our own finalizer (handlers.teardown) holds a
VM for its teardown, so kopf keeps no finalizer and no handler state on VirtualMachines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping
from typing import Any

import kopf

from ..core.api.common import GROUP, VERSION
from ..core.errors import ErrorCode
from ..core.logs import get_logger
from ..reconcile.runtime import Runtime
from .iso import vm_references_changed
from .startup import runtime_of
from . import vm_hosts  # noqa: F401  (registers the per-host daemon host_vm_sync)
from .vm_reconcile import reconcile_vm
from .vm_state import PLURAL, VM_DELETED_HOOKS, VmState, state_of
from .watch_copies import from_watch, plain_copy

log = get_logger(__name__)
# VM reconciles running at once (each host's libvirt calls are bounded by its own call slots).
WORKERS = int(os.environ.get("LIBVIRT_OPERATOR_VM_WORKERS", "32"))
WAKE_DEBOUNCE_SECONDS = 0.2            # a burst of host/ISO events wakes the waiting VMs once


# --------------------------------------------------------------------------------------------
# Watch-fed views
# --------------------------------------------------------------------------------------------

@kopf.on.event(GROUP, VERSION, "libvirthosts")
async def watch_hosts(type: str | None, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    rt = runtime_of(memo)
    st = state_of(rt)
    before = st.hosts.get(name)
    if type == "DELETED":
        if not st.host_replaced(name, body):
            st.hosts.pop(name, None)
    else:
        if not (body.get("metadata") or {}).get("deletionTimestamp"):
            rt.pool.exists(name)  # re-created after a deletion: connectable from the moment the view shows it
        st.hosts[name] = plain_copy(body)
    memo["hosts_changed"] = st.parked_wake  # host probes (handlers.host) wake parked VMs too
    if before is None or type == "DELETED" or _placement_view(before) != _placement_view(st.hosts[name]):
        st.parked_wake.set()  # not for a new lastProbeTime: every probe would re-run every parked VM
    if before is None or type == "DELETED" or _admission_view(before) != _admission_view(st.hosts[name]):
        # Its spec or labels changed (tenancy, pools, networks, declared out of service): the VMs placed
        # there decide now (refused: never restarted; fenced: hostFailurePolicy), whatever they wait for.
        for uid in sorted(st.on_host.get(name) or ()):
            st.retry.add(uid)
    st.wake_host(name)


def _admission_view(host: Mapping[str, Any]) -> tuple[Any, ...]:
    """What decides whether a host keeps (and may restart) the VMs placed there."""
    meta = host.get("metadata") or {}
    return meta.get("labels"), bool(meta.get("deletionTimestamp")), host.get("spec")


def _placement_view(host: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a parked VM's placement can depend on: all but probe timestamps and orphan reports."""
    meta, status = host.get("metadata") or {}, host.get("status") or {}
    return (meta.get("labels"), meta.get("deletionTimestamp"), host.get("spec"),
            {k: v for k, v in status.items() if k not in ("lastProbeTime", "orphanedDomains", "conditions")},
            [(c.get("type"), c.get("status"), c.get("reason")) for c in status.get("conditions") or []])


@kopf.on.event(GROUP, VERSION, "isoimages")
async def watch_isos(type: str | None, name: str, namespace: str, body: kopf.Body, memo: kopf.Memo,
                     **_: Any) -> None:
    st = state_of(runtime_of(memo))
    if type == "DELETED":
        st.isos.pop((namespace, name), None)
    else:
        st.isos[(namespace, name)] = plain_copy(body)
    st.media_wake.set()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def watch_vms(type: str | None, uid: str, body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    rt = runtime_of(memo)
    st = state_of(rt)
    before = st.vms.get(uid)
    if type == "DELETED" or (before is not None and before.get("spec") != dict(body.get("spec") or {})):
        # A blocked ISOImage deletion (handlers.iso) may wait for this VM: queue it.
        names = _iso_refs(before) | _iso_refs(body)
        if names:
            vm_references_changed(rt, body["metadata"]["namespace"], names)
    if type == "DELETED":
        st.forget(uid)
        for hook in VM_DELETED_HOOKS:
            await hook(rt, body, kwargs)  # kopf passes its indexes as keyword arguments
        return
    vm = st.vms[uid] = from_watch(body, before)
    st.index(uid)
    reason = needs_reconcile(before, vm)
    if reason == "spec":
        st.retry.reset(uid)  # a new spec: the backoff starts over
    if reason is not None:
        st.retry.add(uid)
    _ensure_loops(rt, st)


def needs_reconcile(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> str | None:
    """Why this watch event queues the VM, or None (our own status writes, resyncs: no reconcile)."""
    if before is None:
        return "new"  # created, or first seen after a (re)start
    old, new = before.get("metadata") or {}, after.get("metadata") or {}
    if old.get("generation") != new.get("generation"):
        return "spec"
    if bool(old.get("deletionTimestamp")) != bool(new.get("deletionTimestamp")):
        return "deletion"
    if old.get("annotations") != new.get("annotations"):
        return "annotations"  # an action request, the force-release annotation
    if new.get("deletionTimestamp") and old.get("finalizers") != new.get("finalizers"):
        return "finalizers"
    return None


def _ensure_loops(rt: Runtime, st: VmState) -> None:
    """The queue's loop and the wake loop, started from a handler so they inherit kopf's context
    (Kubernetes Event posting)."""
    if st.queue_task is None or st.queue_task.done():
        st.queue_task = asyncio.create_task(
            st.retry.run(lambda key: reconcile_vm(rt, st, key), concurrency=WORKERS), name="vm-work-queue")
    if st.wake_task is None or st.wake_task.done():
        st.wake_task = asyncio.create_task(wake_loop(st), name="vm-wake-loop")


async def wake_loop(st: VmState) -> None:
    """Host/namespace changes wake every waiting VM, ISOImage changes those waiting for media (debounced)."""
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


def _iso_refs(vm: Mapping[str, Any] | None) -> set[str]:
    """The ISOImages a VM's cdroms name."""
    disks = ((vm or {}).get("spec") or {}).get("disks") or []
    return {ref["name"] for disk in disks
            if (ref := ((disk or {}).get("cdrom") or {}).get("isoImageRef") or {}).get("name")}


@kopf.on.cleanup()
async def stop_vm_loops(memo: kopf.Memo, **_: Any) -> None:
    rt = memo.get("runtime")
    if rt is None or "vm" not in rt.extras:
        return
    for task in (rt.extras["vm"].queue_task, rt.extras["vm"].wake_task):
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

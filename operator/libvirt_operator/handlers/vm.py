"""VirtualMachine handlers.

* create/update/resume → the full reconcile (placement, media, volumes, definition, power);
  delete → teardown behind the finalizer (kopf adds it: settings.persistence.finalizer).
* In-memory views of LibvirtHosts, VirtualMachines and ISOImages (watch-fed, `@kopf.on.event`,
  below; kept in handlers.vm_state), used for placement and by the background loops.
* One daemon per LibvirtHost (handlers.vm_hosts): lifecycle events mark VMs dirty; a round
  refreshes them from ONE bulk libvirt call, a periodic full sweep refreshes all of the host's VMs.
* Placement reads reservations from a per-host index (handlers.vm_state); a placement decision is
  recorded at once (before define/start), so concurrent placements never share the same free capacity.
* Waiting costs no kopf worker: a VM waiting on something (no host, host not ready, ISO not imported,
  not schedulable, namespace refused, any retryable error) gets its status and the handler returns.
  ONE requeue loop (handlers.requeue: a heap, per-VM exponential backoff, bounded concurrency;
  started here, run by handlers.vm_retry) re-runs the same sync path for the VMs that are due,
  and watch events (hosts, ISOImages, namespaces) make the parked ones due at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import kopf

from ..core.api.common import GROUP, VERSION
from ..core.errors import AppError
from ..core.logs import get_logger
from ..reconcile.runtime import Runtime
from ..reconcile.vm import sync_vm
from .instrument import reconciler
from .iso import wake_deletions as wake_iso_deletions
from .teardown import TEARDOWN_FINALIZER, hold_for_teardown, release_teardown
from .startup import runtime_of
from . import vm_hosts  # noqa: F401  (registers the per-host daemon host_vm_sync)
from .vm_apply import action_request, apply_outcome
from .vm_retry import retry_one, wake_loop
from .vm_teardown import DELETE_RETRY_CAP_SECONDS, vm_held_for_teardown, teardown_vm
from .vm_state import PLURAL, VmState, load_hosts, plain_copy, state_of

log = get_logger(__name__)
RETRY_CONCURRENCY = 8                  # requeued reconciles running at once


# --------------------------------------------------------------------------------------------
# Watch-fed views
# --------------------------------------------------------------------------------------------

@kopf.on.event(GROUP, VERSION, "libvirthosts")
async def watch_hosts(type: str | None, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    st = state_of(runtime_of(memo))
    before = st.hosts.get(name)
    if type == "DELETED":
        st.hosts.pop(name, None)
    else:
        st.hosts[name] = plain_copy(body)
    memo["hosts_changed"] = st.parked_wake  # host probes (handlers.host) wake parked VMs too
    if before is None or type == "DELETED" or _placement_view(before) != _placement_view(st.hosts[name]):
        st.parked_wake.set()  # not for a new lastProbeTime: every probe would re-run every parked VM
    if type != "DELETED" and _out_of_service(st.hosts[name]) and not _out_of_service(before):
        # Declared fenced: its VMs decide now whether they leave (hostFailurePolicy), whatever they wait for.
        for uid in sorted(st.on_host.get(name) or ()):
            st.retry.schedule(uid, 0)
    st.wake_host(name)


def _out_of_service(host: Mapping[str, Any] | None) -> bool:
    return bool(((host or {}).get("spec") or {}).get("outOfService"))


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
async def watch_vms(type: str | None, uid: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    st = state_of(runtime_of(memo))
    before = st.vms.get(uid)
    if type == "DELETED" or (before is not None and before.get("spec") != dict(body.get("spec") or {})):
        # A blocked ISOImage deletion (handlers.iso) may wait for this VM: look again at once.
        names = _iso_refs(before) | _iso_refs(body)
        if names:
            wake_iso_deletions(runtime_of(memo), body["metadata"]["namespace"], names)
    if type == "DELETED":
        st.forget(uid)
    else:
        st.vms[uid] = plain_copy(body)
        st.index(uid)
        if vm_held_for_teardown(st.vms[uid]):
            if uid not in st.retry:
                st.retry.schedule(uid, 0)  # e.g. after a restart: nobody else will look at it
            elif before is None or not vm_held_for_teardown(before):
                st.retry.wake([uid])  # just handed over by kopf: not after an old waiting backoff
            elif ((before or {}).get("metadata") or {}).get("annotations") != body["metadata"].get("annotations"):
                st.retry.wake([uid])  # e.g. the force-release annotation
        elif action_request(before) != action_request(st.vms[uid]):
            # kopf ignores annotations under its own storage prefix (ours): no update handler runs for
            # an action request. The requeue loop runs the full reconcile, which executes it (never the
            # host's round: a graceful stop may take the grace period and would hold up the host's VMs).
            st.retry.schedule(uid, 0)
    if st.parked_task is None or st.parked_task.done():
        # Started from a handler so they inherit kopf's context (Kubernetes Event posting).
        rt = runtime_of(memo)
        st.parked_task = asyncio.create_task(
            st.retry.run(lambda key: retry_one(rt, st, key), concurrency=RETRY_CONCURRENCY), name="vm-requeue-loop")
    if st.wake_task is None or st.wake_task.done():
        st.wake_task = asyncio.create_task(wake_loop(st), name="vm-wake-loop")


def _iso_refs(vm: Mapping[str, Any] | None) -> set[str]:
    """The ISOImages a VM's cdroms name."""
    disks = ((vm or {}).get("spec") or {}).get("disks") or []
    return {ref["name"] for disk in disks
            if (ref := ((disk or {}).get("cdrom") or {}).get("isoImageRef") or {}).get("name")}


def _current(st: VmState, body: Mapping[str, Any]) -> dict[str, Any]:
    """The freshest copy: the cache has our own status writes, the handler's body may not."""
    uid = (body.get("metadata") or {}).get("uid")
    cached = st.vms.get(uid) if uid else None
    return cached if cached is not None else plain_copy(body)


# --------------------------------------------------------------------------------------------
# Spec-driven reconcile
# --------------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def _locked_vm(memo: kopf.Memo, meta: kopf.Meta,
                     body: kopf.Body) -> AsyncIterator[tuple[Runtime, VmState, dict[str, Any]]]:
    """The shared start of the spec-driven handlers: hosts loaded, this VM's lock held, its freshest copy."""
    rt = runtime_of(memo)
    st = state_of(rt)
    await load_hosts(rt, st)
    async with st.lock(meta["uid"]):
        yield rt, st, _current(st, body)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
@reconciler("virtualmachine", "VirtualMachine")
async def reconcile_vm(body: kopf.Body, meta: kopf.Meta, memo: kopf.Memo, patch: kopf.Patch, **_: Any) -> None:
    """Never raises TemporaryError for a VM that waits: kopf would sleep out the delay in this
    object's worker. The status says what it waits for; `apply_outcome` queues the retry (`st.retry`)."""
    async with _locked_vm(memo, meta, body) as (rt, st, vm):
        if vm["metadata"].get("deletionTimestamp"):
            return
        if TEARDOWN_FINALIZER not in (meta.get("finalizers") or []):
            # Our own patch, not a kopf patch function: kopf keeps a patch function whose patch failed
            # for its next cycle, and runs no handler of the object (its deletion either) meanwhile.
            await hold_for_teardown(rt, PLURAL, meta)
        st.retry.reset(meta["uid"])  # a new spec (or a restart): the backoff starts over
        outcome = await sync_vm(vm, rt, st.view(rt))
        await apply_outcome(rt, st, vm, outcome)


@kopf.on.delete(GROUP, VERSION, PLURAL)
@reconciler("virtualmachine", "VirtualMachine")
async def delete_vm_handler(body: kopf.Body, meta: kopf.Meta, memo: kopf.Memo, patch: kopf.Patch, retry: int,
                            **_: Any) -> None:
    async with _locked_vm(memo, meta, body) as (rt, st, vm):
        vm["metadata"] = dict(body.get("metadata") or {})  # annotations (force-release) from the event
        released = await teardown_vm(rt, st, vm)
    if released:
        # Our finalizer goes first, by itself, while kopf's still holds the object: a patch function
        # in kopf's final patch can lose a resourceVersion race, and kopf never comes back to an object
        # without its own finalizer.
        try:
            await rt.kube.remove_finalizer(PLURAL, meta["namespace"], meta["name"], TEARDOWN_FINALIZER)
        except AppError as err:
            log.info("removing the teardown finalizer failed; kopf's patch tries again", uid=meta["uid"],
                     code=err.code.value, error=err.message)
            patch.fns.append(release_teardown)
        return
    if TEARDOWN_FINALIZER in (meta.get("finalizers") or []):
        # A TemporaryError would make kopf sleep out its delay in this object's worker for as long as
        # the host stays away. Our finalizer keeps the object once kopf's is gone; the requeue loop
        # retries the teardown and removes it (`_retry_teardown`).
        return
    # Deleted before our finalizer was added: kopf's is all that holds it.
    st = state_of(runtime_of(memo))
    st.retry.done(meta["uid"])
    error = (vm.get("status") or {}).get("error") or {}
    raise kopf.TemporaryError(error.get("message") or "deletion blocked",
                              delay=min(DELETE_RETRY_CAP_SECONDS, 2.0 * 2 ** min(retry, 4)))




@kopf.on.cleanup()
async def stop_vm_loops(memo: kopf.Memo, **_: Any) -> None:
    rt = memo.get("runtime")
    if rt is None or "vm" not in rt.extras:
        return
    for task in (rt.extras["vm"].parked_task, rt.extras["vm"].wake_task):
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

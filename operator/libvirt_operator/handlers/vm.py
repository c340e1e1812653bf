"""VirtualMachine handlers.

* create/update/resume → the full reconcile (placement, media, volumes, definition, power);
  delete → teardown behind the finalizer (kopf adds it: settings.persistence.finalizer).
* In-memory views of LibvirtHosts, VirtualMachines and ISOImages (watch-fed, `@kopf.on.event`),
  used for placement and by the background loops below.
* One daemon per LibvirtHost: subscribes (once per connection) to the host's domain lifecycle
  events. An event marks its domain's VM dirty; within ~0.1 s a round refreshes the dirty VMs (and
  those whose requeue is due) from ONE bulk libvirt call. Every RESYNC_SECONDS a full sweep
  refreshes all of the host's VMs (and checks for orphaned domains). Status is patched only when
  it changed.
* Placement reads reservations from a per-host index kept here; a placement decision is recorded
  at once (before define/start), so concurrent placements never share the same free capacity.
* Waiting costs no kopf worker: a VM waiting on something (no host, host not ready, ISO not imported,
  not schedulable, namespace refused, any retryable error) gets its status and the handler returns.
  ONE requeue loop (handlers.requeue: a heap, per-VM exponential backoff, bounded concurrency)
  re-runs the same sync path for the VMs that are due, and watch events (hosts, ISOImages,
  namespaces) make the parked ones due at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import kopf

from ..adapters.libvirt import domains
from ..adapters.libvirt.events import deliver, ensure_event_thread
from ..core.api.common import GROUP, VERSION
from ..core.domain import ABSENT
from ..core.errors import AppError, ErrorCode
from ..core.logs import get_logger
from ..core.metrics import DOMAIN_EVENTS, VM_RESYNC_SECONDS
from ..reconcile.failures import error_status, human_message
from ..reconcile.runtime import Runtime
from ..reconcile.status import merge_patch
from ..reconcile.vm import VmOutcome, delete_vm, host_lost_status, sync_vm
from .instrument import ended_with, reconciler
from .iso import wake_deletions as wake_iso_deletions
from .teardown import TEARDOWN_FINALIZER, held_for_teardown, hold_for_teardown, release_teardown
from .startup import runtime_of
from .vm_apply import _action_request, _apply
from .vm_orphans import _check_orphans
from .vm_state import BUSY_RETRY_SECONDS, PLURAL, VmState, _load_hosts, _plain, _vm_log, state_of

log = get_logger(__name__)
RESYNC_SECONDS = 10.0                  # full sweep of a host's VMs: the safety net for lost events
ORPHAN_CHECK_SECONDS = RESYNC_SECONDS  # free when every domain is accounted for
EVENT_DEBOUNCE_SECONDS = 0.1
RETRY_CONCURRENCY = 8                  # requeued reconciles running at once
WAKE_DEBOUNCE_SECONDS = 0.2            # a burst of host/ISO events wakes the parked VMs once
HOST_RETRY_CAP_SECONDS = 60.0         # a host that does not answer: 5 s, 10 s, … (its probe's Ready change wakes)
DELETE_RETRY_CAP_SECONDS = 10.0  # so a force-release annotation is honoured quickly


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
        st.hosts[name] = _plain(body)
    memo["hosts_changed"] = st.parked_wake  # host probes (handlers.host) wake parked VMs too
    if before is None or type == "DELETED" or _placement_view(before) != _placement_view(st.hosts[name]):
        st.parked_wake.set()  # not for a new lastProbeTime: every probe would re-run every parked VM
    st.wake_host(name)


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
        st.isos[(namespace, name)] = _plain(body)
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
        st.vms[uid] = _plain(body)
        st.index(uid)
        if _held_for_teardown(st.vms[uid]):
            if uid not in st.retry:
                st.retry.schedule(uid, 0)  # e.g. after a restart: nobody else will look at it
            elif before is None or not _held_for_teardown(before):
                st.retry.wake([uid])  # just handed over by kopf: not after an old waiting backoff
            elif ((before or {}).get("metadata") or {}).get("annotations") != body["metadata"].get("annotations"):
                st.retry.wake([uid])  # e.g. the force-release annotation
        elif _action_request(before) != _action_request(st.vms[uid]):
            # kopf ignores annotations under its own storage prefix (ours): no update handler runs for
            # an action request. The requeue loop runs the full reconcile, which executes it (never the
            # host's round: a graceful stop may take the grace period and would hold up the host's VMs).
            st.retry.schedule(uid, 0)
    if st.parked_task is None or st.parked_task.done():
        # Started from a handler so they inherit kopf's context (Kubernetes Event posting).
        rt = runtime_of(memo)
        st.parked_task = asyncio.create_task(
            st.retry.run(lambda key: _retry_one(rt, st, key), concurrency=RETRY_CONCURRENCY), name="vm-requeue-loop")
    if st.wake_task is None or st.wake_task.done():
        st.wake_task = asyncio.create_task(_wake_loop(st), name="vm-wake-loop")


def _iso_refs(vm: Mapping[str, Any] | None) -> set[str]:
    """The ISOImages a VM's cdroms name."""
    disks = ((vm or {}).get("spec") or {}).get("disks") or []
    return {ref["name"] for disk in disks
            if (ref := ((disk or {}).get("cdrom") or {}).get("isoImageRef") or {}).get("name")}


def _current(st: VmState, body: Mapping[str, Any]) -> dict[str, Any]:
    """The freshest copy: the cache has our own status writes, the handler's body may not."""
    uid = (body.get("metadata") or {}).get("uid")
    cached = st.vms.get(uid) if uid else None
    return cached if cached is not None else _plain(body)


# --------------------------------------------------------------------------------------------
# Spec-driven reconcile
# --------------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def _locked_vm(memo: kopf.Memo, meta: kopf.Meta,
                     body: kopf.Body) -> AsyncIterator[tuple[Runtime, VmState, dict[str, Any]]]:
    """The shared start of the spec-driven handlers: hosts loaded, this VM's lock held, its freshest copy."""
    rt = runtime_of(memo)
    st = state_of(rt)
    await _load_hosts(rt, st)
    async with st.lock(meta["uid"]):
        yield rt, st, _current(st, body)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
@reconciler("virtualmachine", "VirtualMachine")
async def reconcile_vm(body: kopf.Body, meta: kopf.Meta, memo: kopf.Memo, patch: kopf.Patch, **_: Any) -> None:
    """Never raises TemporaryError for a VM that waits: kopf would sleep out the delay in this
    object's worker. The status says what it waits for; `_apply` queues the retry (`st.retry`)."""
    async with _locked_vm(memo, meta, body) as (rt, st, vm):
        if vm["metadata"].get("deletionTimestamp"):
            return
        if TEARDOWN_FINALIZER not in (meta.get("finalizers") or []):
            # Our own patch, not a kopf patch function: kopf keeps a patch function whose patch failed
            # for its next cycle, and runs no handler of the object (its deletion either) meanwhile.
            await hold_for_teardown(rt, PLURAL, meta)
        st.retry.reset(meta["uid"])  # a new spec (or a restart): the backoff starts over
        outcome = await sync_vm(vm, rt, st.view(rt))
        await _apply(rt, st, vm, outcome)


async def _teardown(rt: Runtime, st: VmState, vm: dict[str, Any]) -> bool:
    """One teardown attempt (the caller holds the VM's lock); True when the VM may go. When blocked
    (its host is gone or unreachable) the status says so and the requeue loop tries again, woken
    by host changes and by the force-release annotation."""
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


@kopf.on.delete(GROUP, VERSION, PLURAL)
@reconciler("virtualmachine", "VirtualMachine")
async def delete_vm_handler(body: kopf.Body, meta: kopf.Meta, memo: kopf.Memo, patch: kopf.Patch, retry: int,
                            **_: Any) -> None:
    async with _locked_vm(memo, meta, body) as (rt, st, vm):
        vm["metadata"] = dict(body.get("metadata") or {})  # annotations (force-release) from the event
        released = await _teardown(rt, st, vm)
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


# --------------------------------------------------------------------------------------------
# Per-host: lifecycle events + bulk resync
# --------------------------------------------------------------------------------------------

@kopf.daemon(GROUP, VERSION, "libvirthosts", cancellation_timeout=5.0)
async def host_vm_sync(name: str, stopped: kopf.DaemonStopped, memo: kopf.Memo, **_: Any) -> None:
    rt = runtime_of(memo)
    st = state_of(rt)
    wake = st.host_wake.setdefault(name, asyncio.Event())
    loop = asyncio.get_running_loop()
    hooked: Any = None
    subscribed = False
    failures = 0  # rounds in a row the host did not answer: backoff (a host change wakes us anyway)

    def mark_dirty(uuid: str) -> None:  # on the operator's loop
        if uuid:
            st.dirty.setdefault(name, set()).add(uuid)  # the domain UUID is the VM's metadata.uid
            st.dirty_queue.added()
        wake.set()

    def on_event(uuid: str, _event: int, _detail: int) -> None:  # on libvirt's event thread
        DOMAIN_EVENTS.labels(name).inc()
        deliver(loop, mark_dirty, uuid)

    ensure_event_thread()

    def hook(conn: Any) -> None:  # every (re)open of the connection subscribes the new virConnect
        domains.subscribe_lifecycle(conn, on_event)

    try:
        while not stopped:
            conn = rt.pool.get(name)
            timeout = RESYNC_SECONDS
            if conn is not None:
                if conn is not hooked:
                    if hooked is not None:
                        with contextlib.suppress(ValueError):
                            hooked.on_connect.remove(hook)
                    conn.on_connect.append(hook)
                    hooked, subscribed = conn, False
                    st.full_synced.pop(name, None)  # a new connection: events may have been missed
                try:
                    if not subscribed:  # once per connection; reconnects re-subscribe through `hook`
                        await conn.call("subscribe", lambda c: domains.subscribe_lifecycle(c, on_event))
                        subscribed = True
                    timeout = await resync_host(rt, st, name, conn)
                    failures = 0
                except AppError as err:
                    failures += 1
                    log.info("host resync failed", kind="LibvirtHost", name=name, code=err.code.value,
                             error=err.message, attempt=failures)
                    st.full_synced.pop(name, None)  # once it answers again, refresh everything
                    await _report_host_lost(rt, st, name, err)
                    timeout = min(HOST_RETRY_CAP_SECONDS, RESYNC_SECONDS / 2 * 2 ** min(failures - 1, 8))
                except Exception:  # noqa: BLE001  (the loop must survive anything)
                    log.exception("host resync crashed", kind="LibvirtHost", name=name)
            else:
                timeout = 1.0
            await _wait_any(wake, stopped, max(0.05, timeout))
            if stopped:
                break
            if wake.is_set():
                await asyncio.sleep(EVENT_DEBOUNCE_SECONDS)  # coalesce a burst of events
            wake.clear()
    finally:
        st.host_wake.pop(name, None)
        st.dirty.pop(name, None)
        st.full_synced.pop(name, None)
        if hooked is not None:
            with contextlib.suppress(ValueError):
                hooked.on_connect.remove(hook)


async def _report_host_lost(rt: Runtime, st: VmState, host: str, err: AppError) -> None:
    """The host could not be listed: its VMs' power state is Unknown until it answers again."""
    for vm in [v for v in st.vms.values() if (v.get("status") or {}).get("host") == host
               and not v["metadata"].get("deletionTimestamp")]:
        uid = vm["metadata"]["uid"]
        lock = st.lock(uid)
        if lock.locked():
            continue
        async with lock:
            current = st.vms.get(uid)
            if current is None or (current.get("status") or {}).get("printableStatus") == "Unknown":
                continue
            previous = (current.get("status") or {}).get("error")
            err_state = await error_status(err, previous, "VirtualMachine", rt.remediator)
            new = host_lost_status(current, err, err_state)
            events = [] if (previous or {}).get("code") == err.code.value else [
                ("Warning", err.reason, human_message(err, err_state))]
            with contextlib.suppress(AppError):
                await _apply(rt, st, current, VmOutcome(new, events, None, None), full=False)


async def _wait_any(wake: asyncio.Event, stopped: kopf.DaemonStopped, timeout: float) -> None:
    async def until_stopped() -> None:
        await stopped.wait()

    tasks = {asyncio.ensure_future(wake.wait()), asyncio.ensure_future(until_stopped())}
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def resync_host(rt: Runtime, st: VmState, host: str, conn: Any) -> float:
    """One round for a host; returns seconds until the next round is due.

    A full sweep (every RESYNC_SECONDS, and after a (re)connect or a failed round) refreshes every
    VM on the host. Other rounds refresh only the VMs named by lifecycle events since the last
    round (`st.dirty`) and those whose requeue deadline has passed. Either way the host is asked
    ONE bulk list_domains, never one lookup per VM; a round with nothing to do asks nothing."""
    now = time.monotonic()
    full = now - st.full_synced.get(host, -math.inf) >= RESYNC_SECONDS
    # With the full sweep (same cadence), so a wake-up in between never costs a bulk call of its own.
    orphan_check_due = full or now - st.orphan_checked.get(host, 0.0) >= ORPHAN_CHECK_SECONDS
    dirty = st.dirty.pop(host, set())
    on_host = st.on_host.get(host) or set()
    if full:
        st.full_synced[host] = now
        targets = set(on_host)
    else:
        targets = {uid for uid in dirty if uid in on_host}
        targets.update(uid for uid, deadline in st.requeue.items() if deadline <= now and uid in on_host)
    # VMs being deleted are the delete handler's (their teardown events cost no round either).
    targets = {uid for uid in targets
               if (vm := st.vms.get(uid)) is not None and not vm["metadata"].get("deletionTimestamp")}
    busy = {uid for uid in targets if (lock := st.locks.get(uid)) is not None and lock.locked()}
    targets -= busy  # a handler holds these right now: look again shortly, without asking libvirt now
    if targets or orphan_check_due:
        started = time.perf_counter()
        observed = await conn.call("list_domains", domains.list_domains)
        if orphan_check_due:
            await _check_orphans(rt, st, host, conn, observed)
        for uid in targets:
            vm = st.vms.get(uid)
            if vm is None or vm["metadata"].get("deletionTimestamp"):
                continue
            status = vm.get("status") or {}
            if status.get("host") != host:
                continue
            obs = observed.get(uid, ABSENT)
            if not obs.exists and (not status.get("domainUUID") or uid in st.parked):
                continue  # not defined yet: the spec-driven reconcile (and the parked loop) is on it
            lock = st.lock(uid)
            if lock.locked():
                busy.add(uid)  # a handler is working on it right now
                continue
            async with lock:
                current = st.vms.get(uid)
                if current is None or current["metadata"].get("deletionTimestamp"):
                    continue
                try:
                    outcome = await sync_vm(current, rt, st.view(rt), observed=obs)
                    await _apply(rt, st, current, outcome, full=False)
                except AppError as err:
                    log.info("VM resync failed", **_vm_log(current), host=host, code=err.code.value,
                             error=err.message)
        VM_RESYNC_SECONDS.labels(host).observe(time.perf_counter() - started)
        st.dirty_queue.worked(time.perf_counter() - started)
    # Events for VMs a handler holds stay dirty (it may have observed the domain before the event,
    # and its status may not show the host yet); other events for domains no VM on this host
    # accounts for are dropped: the full sweep and the orphan check cover those.
    for uid in dirty - targets:
        lock = st.locks.get(uid)
        vm = st.vms.get(uid)
        if lock is not None and lock.locked() and vm is not None and not vm["metadata"].get("deletionTimestamp"):
            busy.add(uid)
    if busy:
        st.dirty.setdefault(host, set()).update(busy)
    now = time.monotonic()
    waits = [RESYNC_SECONDS - (now - st.full_synced.get(host, now))]
    if busy:
        waits.append(BUSY_RETRY_SECONDS)
    for uid, deadline in st.requeue.items():
        if uid in on_host:
            # Due but not refreshed (held by a handler, or not defined yet): not a busy loop.
            waits.append(deadline - now if deadline > now else BUSY_RETRY_SECONDS)
    return min(waits)


# --------------------------------------------------------------------------------------------
# Waiting VMs: one requeue loop (backoff) + wake-ups from watch events
# --------------------------------------------------------------------------------------------

@reconciler("virtualmachine", "VirtualMachine")  # a requeued reconcile is a reconcile
async def _retry_one(rt: Runtime, st: VmState, uid: str) -> None:
    """A due VM: the same sync path as the handler (sync_vm + _apply, under the VM's lock)."""
    vm = st.vms.get(uid)
    if vm is not None and _held_for_teardown(vm):
        await _retry_teardown(rt, st, uid)
        return
    if vm is None or vm["metadata"].get("deletionTimestamp"):
        st.parked.pop(uid, None)
        st.retry.done(uid)
        return
    lock = st.lock(uid)
    if lock.locked():  # a handler or the host's round is on it; look again shortly unless it decides
        st.retry.schedule(uid, BUSY_RETRY_SECONDS)
        return
    await _load_hosts(rt, st)
    async with lock:
        vm = st.vms.get(uid)
        if vm is None or vm["metadata"].get("deletionTimestamp"):
            return
        try:
            outcome = await sync_vm(vm, rt, st.view(rt))
            await _apply(rt, st, vm, outcome)
        except AppError as err:  # e.g. the status patch failed: back off and try again
            log.info("requeued VM reconcile failed", **_vm_log(vm), code=err.code.value, error=err.message)
            ended_with(err)
            st.retry.failed(uid)


def _held_for_teardown(vm: Mapping[str, Any]) -> bool:
    return held_for_teardown(vm.get("metadata") or {})


async def _retry_teardown(rt: Runtime, st: VmState, uid: str) -> None:
    lock = st.lock(uid)
    if lock.locked():
        st.retry.schedule(uid, BUSY_RETRY_SECONDS)
        return
    await _load_hosts(rt, st)  # an unplaced VM's teardown searches every known host
    async with lock:
        vm = st.vms.get(uid)
        if vm is None or not _held_for_teardown(vm):
            return
        meta = vm["metadata"]
        try:
            if await _teardown(rt, st, vm):
                await rt.kube.remove_finalizer(PLURAL, meta["namespace"], meta["name"], TEARDOWN_FINALIZER)
        except AppError as err:
            log.info("VM teardown retry failed", **_vm_log(vm), code=err.code.value, error=err.message)
            st.retry.failed(uid, at_most=DELETE_RETRY_CAP_SECONDS)


async def _wake_loop(st: VmState) -> None:
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

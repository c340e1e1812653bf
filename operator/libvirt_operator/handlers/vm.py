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
* A wake-up loop retries VMs parked on placement or media as soon as hosts or ISOImages change.
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
from ..core.metrics import DOMAIN_EVENTS, ORPHANED_DOMAINS, VM_RESYNC_SECONDS
from ..reconcile import orphans, plan
from ..reconcile.failures import error_status, human_message, retry_delay
from ..reconcile.runtime import Runtime
from ..reconcile.status import merge_patch
from ..reconcile.vm import ClusterView, VmOutcome, delete_vm, host_lost_status, sync_vm
from .instrument import reconciler
from .startup import runtime_of

log = get_logger(__name__)
PLURAL = "virtualmachines"
RESYNC_SECONDS = 10.0                  # full sweep of a host's VMs: the safety net for lost events
ORPHAN_CHECK_SECONDS = RESYNC_SECONDS  # free when every domain is accounted for
EVENT_DEBOUNCE_SECONDS = 0.1
BUSY_RETRY_SECONDS = 0.5               # a dirty VM a handler was working on is looked at again
PARKED_RECHECK_SECONDS = 15.0
RETRY_CAP_SECONDS = 60.0
DELETE_RETRY_CAP_SECONDS = 10.0  # so a force-release annotation is honoured quickly


class VmState:
    """Per-process state of the VM controller (kept in Runtime.extras)."""

    def __init__(self) -> None:
        self.hosts: dict[str, dict[str, Any]] = {}
        self.vms: dict[str, dict[str, Any]] = {}           # uid → object
        self.isos: dict[tuple[str, str], dict[str, Any]] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.requeue: dict[str, float] = {}                # uid → monotonic deadline
        self.host_wake: dict[str, asyncio.Event] = {}      # host → wake its daemon
        self.parked: set[str] = set()                      # uids waiting for placement/media
        self.parked_wake = asyncio.Event()
        self.parked_task: asyncio.Task[None] | None = None
        self.hosts_loaded = False
        self.orphan_candidates: dict[str, set[str]] = {}   # host → owned, unaccounted domain uuids
        self.orphan_checked: dict[str, float] = {}         # host → monotonic time of the last check
        self.dirty: dict[str, set[str]] = {}               # host → uids named by lifecycle events
        self.full_synced: dict[str, float] = {}            # host → monotonic time of the last full sweep
        # Indexes over `vms` (kept by `index`): uids by status.host, and reservations by host.
        self.on_host: dict[str, set[str]] = {}
        self.reserved_on: dict[str, dict[str, plan.Reservation]] = {}
        self.pending: dict[str, plan.Reservation] = {}     # placement decisions (until the VM is gone)
        self._host_of: dict[str, str] = {}                 # uid → key in on_host
        self._reserved_at: dict[str, str] = {}             # uid → key in reserved_on

    def lock(self, uid: str) -> asyncio.Lock:
        return self.locks.setdefault(uid, asyncio.Lock())

    def index(self, uid: str) -> None:
        """Re-file one VM after its cached object (or status) changed: O(1)."""
        vm = self.vms.get(uid)
        deleting = vm is not None and bool(vm["metadata"].get("deletionTimestamp"))
        host = None if vm is None else (vm.get("status") or {}).get("host")
        old = self._host_of.pop(uid, None)
        if old is not None:
            self.on_host.get(old, set()).discard(uid)
        if host:
            self._host_of[uid] = host
            self.on_host.setdefault(host, set()).add(uid)
        if deleting:
            reservation = None
        elif host:
            reservation = plan.reservation_of(vm)  # the status speaks for itself
        else:
            # Placed but the cache does not show it (yet, or again: an older watch event may land
            # after our status write): the placement decision still holds.
            reservation = self.pending.get(uid)
        old = self._reserved_at.pop(uid, None)
        if old is not None:
            self.reserved_on.get(old, {}).pop(uid, None)
        if reservation is not None:
            self._reserved_at[uid] = reservation.host
            self.reserved_on.setdefault(reservation.host, {})[uid] = reservation

    def forget(self, uid: str) -> None:
        """The VirtualMachine is gone."""
        self.vms.pop(uid, None)
        self.pending.pop(uid, None)
        self.locks.pop(uid, None)
        self.requeue.pop(uid, None)
        self.parked.discard(uid)
        self.index(uid)

    def placed(self, uid: str, reservation: plan.Reservation | None) -> None:
        """A placement decision (sync_vm, right after choose_host): counted by the next placement."""
        if reservation is None:
            self.pending.pop(uid, None)
        else:
            self.pending[uid] = reservation
        self.index(uid)

    def reserved(self, hosts: list[str], exclude_uid: str) -> list[plan.Reservation]:
        """Reservations on these hosts: O(VMs on them), no parsing (precomputed by `index`)."""
        return [r for h in hosts for uid, r in (self.reserved_on.get(h) or {}).items() if uid != exclude_uid]

    def wake_host(self, host: str | None) -> None:
        if host and host in self.host_wake:
            self.host_wake[host].set()

    def view(self) -> ClusterView:
        return ClusterView(hosts=self.hosts, vms=lambda: list(self.vms.values()),
                           iso=lambda ns, name: self.isos.get((ns, name)),
                           reserved=self.reserved, placed=self.placed)


def state_of(rt: Runtime) -> VmState:
    state = rt.extras.get("vm")
    if state is None:
        state = rt.extras["vm"] = VmState()
    return state


# --------------------------------------------------------------------------------------------
# Watch-fed views
# --------------------------------------------------------------------------------------------

def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": dict(body.get("metadata") or {}), "spec": dict(body.get("spec") or {}),
            "status": dict(body.get("status") or {})}


@kopf.on.event(GROUP, VERSION, "libvirthosts")
async def watch_hosts(type: str | None, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    st = state_of(runtime_of(memo))
    if type == "DELETED":
        st.hosts.pop(name, None)
    else:
        st.hosts[name] = _plain(body)
    memo["hosts_changed"] = st.parked_wake  # host probes (handlers.host) wake parked VMs too
    st.parked_wake.set()
    st.wake_host(name)


@kopf.on.event(GROUP, VERSION, "isoimages")
async def watch_isos(type: str | None, name: str, namespace: str, body: kopf.Body, memo: kopf.Memo,
                     **_: Any) -> None:
    st = state_of(runtime_of(memo))
    if type == "DELETED":
        st.isos.pop((namespace, name), None)
    else:
        st.isos[(namespace, name)] = _plain(body)
    st.parked_wake.set()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def watch_vms(type: str | None, uid: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    st = state_of(runtime_of(memo))
    if type == "DELETED":
        st.forget(uid)
    else:
        st.vms[uid] = _plain(body)
        st.index(uid)
    if st.parked_task is None or st.parked_task.done():
        # Started from a handler so it inherits kopf's context (Kubernetes Event posting).
        st.parked_task = asyncio.create_task(_parked_loop(runtime_of(memo)), name="vm-parked-loop")


async def _load_hosts(rt: Runtime, st: VmState) -> None:
    """At start-up the VM watch may deliver before the host watch: list hosts once."""
    if st.hosts_loaded:
        return
    st.hosts_loaded = True
    with contextlib.suppress(AppError):
        for obj in await rt.kube.list_objects("libvirthosts"):
            st.hosts.setdefault(obj["metadata"]["name"], _plain(obj))


# --------------------------------------------------------------------------------------------
# Applying an outcome: status (only when changed), Events, requeue
# --------------------------------------------------------------------------------------------

async def _apply(rt: Runtime, st: VmState, vm: dict[str, Any], outcome: VmOutcome) -> None:
    meta = vm["metadata"]
    uid = meta["uid"]
    patch = merge_patch(vm.get("status") or {}, outcome.status)
    if patch:
        await rt.kube.patch_status(PLURAL, meta["namespace"], meta["name"], patch)
        cached = st.vms.get(uid)
        if cached is not None:  # our write is newer than the cache until the watch delivers it
            cached["status"] = dict(outcome.status)
        st.index(uid)
    for type_, reason, message in outcome.events:
        kopf.event(vm, type=type_, reason=reason, message=message)
    code = outcome.error.code if outcome.error else None
    if code in (ErrorCode.NO_SCHEDULABLE_HOST, ErrorCode.INSUFFICIENT_RESOURCES, ErrorCode.ISO_NOT_FOUND,
                ErrorCode.HOST_NOT_FOUND, ErrorCode.HOST_UNREACHABLE) and outcome.error.retryable:
        st.parked.add(uid)
    else:
        st.parked.discard(uid)
    if outcome.requeue_after is not None:
        st.requeue[uid] = time.monotonic() + outcome.requeue_after
        st.wake_host(outcome.status.get("host"))
    else:
        st.requeue.pop(uid, None)


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
async def reconcile_vm(body: kopf.Body, meta: kopf.Meta, memo: kopf.Memo, retry: int, **_: Any) -> None:
    async with _locked_vm(memo, meta, body) as (rt, st, vm):
        if vm["metadata"].get("deletionTimestamp"):
            return
        outcome = await sync_vm(vm, rt, st.view())
        await _apply(rt, st, vm, outcome)
    if outcome.retry:
        assert outcome.error is not None
        raise kopf.TemporaryError(outcome.error.message,
                                  delay=retry_delay(retry + 1, base=2.0, cap=RETRY_CAP_SECONDS))


@kopf.on.delete(GROUP, VERSION, PLURAL)
@reconciler("virtualmachine", "VirtualMachine")
async def delete_vm_handler(body: kopf.Body, meta: kopf.Meta, memo: kopf.Memo, retry: int, **_: Any) -> None:
    uid = meta["uid"]
    async with _locked_vm(memo, meta, body) as (rt, st, vm):
        vm["metadata"] = dict(body.get("metadata") or {})  # annotations (force-release) from the event
        outcome = await delete_vm(vm, rt, st.view())
        for type_, reason, message in outcome.events:
            kopf.event(vm, type=type_, reason=reason, message=message)
        if outcome.released:
            st.requeue.pop(uid, None)
            st.parked.discard(uid)
            return
        if outcome.status is not None:
            patch = merge_patch(vm.get("status") or {}, outcome.status)
            if patch:
                await rt.kube.patch_status(PLURAL, meta["namespace"], meta["name"], patch)
                vm["status"] = outcome.status
        st.index(uid)
    message = outcome.error.message if outcome.error else "deletion blocked"
    raise kopf.TemporaryError(message, delay=retry_delay(retry + 1, base=2.0, cap=DELETE_RETRY_CAP_SECONDS))


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

    def mark_dirty(uuid: str) -> None:  # on the operator's loop
        if uuid:
            st.dirty.setdefault(name, set()).add(uuid)  # the domain UUID is the VM's metadata.uid
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
                except AppError as err:
                    log.info("host resync failed", host=name, code=err.code.value, error=err.message)
                    st.full_synced.pop(name, None)  # once it answers again, refresh everything
                    await _report_host_lost(rt, st, name, err)
                    timeout = RESYNC_SECONDS / 2
                except Exception:  # noqa: BLE001  (the loop must survive anything)
                    log.exception("host resync crashed", host=name)
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
                await _apply(rt, st, current, VmOutcome(new, events, None, None))


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
                    outcome = await sync_vm(current, rt, st.view(), observed=obs)
                    await _apply(rt, st, current, outcome)
                except AppError as err:
                    log.info("VM resync failed", uid=uid, code=err.code.value, error=err.message)
        VM_RESYNC_SECONDS.labels(host).observe(time.perf_counter() - started)
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


async def _check_orphans(rt: Runtime, st: VmState, host: str, conn: Any, observed: Mapping[str, Any]) -> None:
    st.orphan_checked[host] = time.monotonic()
    unknown = orphans.unaccounted(observed, st.vms)
    candidates = await conn.call("owners", lambda c: domains.owners(c, unknown)) if unknown else {}
    confirmed = orphans.confirmed_orphans(candidates, st.orphan_candidates.get(host, set()))
    st.orphan_candidates[host] = {u for u, meta in candidates.items() if meta.owner is not None}
    ORPHANED_DOMAINS.labels(host).set(len(confirmed))
    entries = orphans.orphan_status(candidates, confirmed)
    current = ((st.hosts.get(host) or {}).get("status") or {}).get("orphanedDomains") or []
    if entries != current:
        if entries:
            log.warning("orphaned domains on host", host=host, domains=[e["uuid"] for e in entries])
        await rt.kube.patch_status("libvirthosts", None, host, {"orphanedDomains": entries or None})


# --------------------------------------------------------------------------------------------
# Parked VMs: retried as soon as hosts or ISOImages change
# --------------------------------------------------------------------------------------------

async def _parked_loop(rt: Runtime) -> None:
    st = state_of(rt)
    while True:
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(st.parked_wake.wait(), timeout=PARKED_RECHECK_SECONDS)
        st.parked_wake.clear()
        await asyncio.sleep(0.2)
        for uid in list(st.parked):
            vm = st.vms.get(uid)
            if vm is None or vm["metadata"].get("deletionTimestamp"):
                st.parked.discard(uid)
                continue
            lock = st.lock(uid)
            if lock.locked():
                continue
            try:
                async with lock:
                    vm = st.vms.get(uid)
                    if vm is None:
                        continue
                    outcome = await sync_vm(vm, rt, st.view())
                    await _apply(rt, st, vm, outcome)
            except Exception:  # noqa: BLE001
                log.exception("parked VM retry failed", uid=uid)


@kopf.on.cleanup()
async def stop_vm_loops(memo: kopf.Memo, **_: Any) -> None:
    rt = memo.get("runtime")
    if rt is None or "vm" not in rt.extras:
        return
    task = rt.extras["vm"].parked_task
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

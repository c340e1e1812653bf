"""VirtualMachine handlers.

* create/update/resume → the full reconcile (placement, media, volumes, definition, power);
  delete → teardown behind the finalizer (kopf adds it: settings.persistence.finalizer).
* In-memory views of LibvirtHosts, VirtualMachines and ISOImages (watch-fed, `@kopf.on.event`),
  used for placement and by the background loops below.
* One daemon per LibvirtHost: subscribes to the host's domain lifecycle events and resyncs all of
  that host's VMs with ONE bulk libvirt call (on an event within ~0.1 s, otherwise periodically);
  status is patched only when it changed.
* A wake-up loop retries VMs parked on placement or media as soon as hosts or ISOImages change.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any

import kopf

from ..adapters.libvirt import domains
from ..adapters.libvirt.events import deliver, ensure_event_thread
from ..core.api.common import GROUP, VERSION
from ..core.domain import ABSENT
from ..core.errors import AppError, ErrorCode
from ..core.logs import get_logger
from ..core.metrics import DOMAIN_EVENTS, ORPHANED_DOMAINS, VM_RESYNC_SECONDS
from ..reconcile import orphans
from ..reconcile.failures import error_status, human_message, retry_delay
from ..reconcile.runtime import Runtime
from ..reconcile.status import merge_patch
from ..reconcile.vm import ClusterView, VmOutcome, delete_vm, host_lost_status, sync_vm
from .instrument import reconciler
from .startup import runtime_of

log = get_logger(__name__)
PLURAL = "virtualmachines"
RESYNC_SECONDS = 10.0
ORPHAN_CHECK_SECONDS = RESYNC_SECONDS  # free when every domain is accounted for
EVENT_DEBOUNCE_SECONDS = 0.1
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

    def lock(self, uid: str) -> asyncio.Lock:
        return self.locks.setdefault(uid, asyncio.Lock())

    def wake_host(self, host: str | None) -> None:
        if host and host in self.host_wake:
            self.host_wake[host].set()

    def view(self) -> ClusterView:
        return ClusterView(hosts=self.hosts, vms=lambda: list(self.vms.values()),
                           iso=lambda ns, name: self.isos.get((ns, name)))


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
        st.vms.pop(uid, None)
        st.locks.pop(uid, None)
        st.requeue.pop(uid, None)
        st.parked.discard(uid)
    else:
        st.vms[uid] = _plain(body)
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

@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
@reconciler("virtualmachine", "VirtualMachine")
async def reconcile_vm(body: kopf.Body, meta: kopf.Meta, memo: kopf.Memo, retry: int, **_: Any) -> None:
    rt = runtime_of(memo)
    st = state_of(rt)
    await _load_hosts(rt, st)
    uid = meta["uid"]
    async with st.lock(uid):
        vm = _current(st, body)
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
    rt = runtime_of(memo)
    st = state_of(rt)
    await _load_hosts(rt, st)
    uid = meta["uid"]
    async with st.lock(uid):
        vm = _current(st, body)
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

    def on_event(_uuid: str, _event: int, _detail: int) -> None:
        DOMAIN_EVENTS.labels(name).inc()
        deliver(loop, wake.set)

    ensure_event_thread()

    def hook(conn: Any) -> None:
        domains.subscribe_lifecycle(conn, on_event)

    try:
        while not stopped:
            conn = rt.pool.get(name)
            timeout = RESYNC_SECONDS
            if conn is not None:
                if conn is not hooked:
                    conn.on_connect.append(hook)
                    hooked = conn
                try:
                    await conn.call("subscribe", lambda c: domains.subscribe_lifecycle(c, on_event))
                    timeout = await resync_host(rt, st, name, conn)
                except AppError as err:
                    log.info("host resync failed", host=name, code=err.code.value, error=err.message)
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
    """Refresh every VM on this host from one bulk call; returns seconds until the next due requeue."""
    vms = [vm for vm in st.vms.values()
           if (vm.get("status") or {}).get("host") == host and not vm["metadata"].get("deletionTimestamp")]
    orphan_check_due = time.monotonic() - st.orphan_checked.get(host, 0.0) >= ORPHAN_CHECK_SECONDS
    if not vms and not orphan_check_due:
        return RESYNC_SECONDS
    started = time.perf_counter()
    observed = await conn.call("list_domains", domains.list_domains)
    if orphan_check_due:
        await _check_orphans(rt, st, host, conn, observed)
    for vm in vms:
        uid = vm["metadata"]["uid"]
        status = vm.get("status") or {}
        obs = observed.get(uid, ABSENT)
        if not obs.exists and (not status.get("domainUUID") or uid in st.parked):
            continue  # not defined yet: the spec-driven reconcile (and the parked loop) is on it
        lock = st.lock(uid)
        if lock.locked():
            continue  # a handler is working on it right now
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
    now = time.monotonic()
    due = [d - now for uid, d in st.requeue.items()
           if (st.vms.get(uid, {}).get("status") or {}).get("host") == host]
    return min([RESYNC_SECONDS, *due])


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

"""Per-host: lifecycle events + bulk resync.

One daemon per LibvirtHost: subscribes (once per connection) to the host's domain lifecycle
events. An event marks its domain's VM dirty; within ~0.1 s a round refreshes the dirty VMs (and
those whose requeue is due) from ONE bulk libvirt call. Every RESYNC_SECONDS a full sweep
refreshes all of the host's VMs (and checks for orphaned domains). Status is patched only when
it changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Any

import kopf

from ..adapters.libvirt import domains
from ..adapters.libvirt.events import deliver, ensure_event_thread
from ..core.api.common import GROUP, VERSION
from ..core.domain import ABSENT
from ..core.errors import AppError
from ..core.logs import get_logger
from ..core.metrics import DOMAIN_EVENTS, VM_RESYNC_SECONDS
from ..reconcile import plan
from ..reconcile.failures import error_status, human_message
from ..reconcile.vm_failover import STALE_HOSTS, remove_stale_copies
from ..reconcile.runtime import Runtime
from ..reconcile.vm import sync_vm
from ..reconcile.vm_status import host_lost_status
from ..reconcile.vm_types import VmOutcome
from .startup import runtime_of
from .vm_apply import apply_outcome
from .vm_orphans import check_orphans
from .vm_state import BUSY_RETRY_SECONDS, PLURAL, VmState, vm_log_fields, state_of

log = get_logger(__name__)
RESYNC_SECONDS = 10.0                  # full sweep of a host's VMs: the safety net for lost events
ORPHAN_CHECK_SECONDS = RESYNC_SECONDS  # free when every domain is accounted for
EVENT_DEBOUNCE_SECONDS = 0.1
HOST_RETRY_CAP_SECONDS = 60.0         # a host that does not answer: 5 s, 10 s, … (its probe's Ready change wakes)


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
                await apply_outcome(rt, st, current, VmOutcome(new, events, None, None), full=False)


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
    stale = set(st.stale_on.get(host) or ())
    if targets or orphan_check_due or stale:
        started = time.perf_counter()
        if stale:  # copies of VMs that left this host while it was out of service: gone first
            await _remove_stale_copies(rt, st, host, conn, stale)
        observed = await conn.call("list_domains", domains.list_domains)
        st.domains_listed(host, conn, observed)  # what the placement search may skip (VmState.absent_from)
        if orphan_check_due:
            await check_orphans(rt, st, host, conn, observed)
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
                    await apply_outcome(rt, st, current, outcome, full=False)
                except AppError as err:
                    log.info("VM resync failed", **vm_log_fields(current), host=host, code=err.code.value,
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


async def _remove_stale_copies(rt: Runtime, st: VmState, host: str, conn: Any, uids: set[str]) -> None:
    """This host answers again: power off and undefine the copies of VMs recreated elsewhere while it was
    out of service (each VM lists it in status.staleDomainHosts), then drop it from those lists."""
    hv = plan.HostView.from_object(st.hosts.get(host) or {"metadata": {"name": host}})
    # Never the VM's live domain: a VM placed here again is not stale here (placement avoids stale hosts).
    uids = {u for u in uids if ((st.vms.get(u) or {}).get("status") or {}).get("host") != host}
    removed = await remove_stale_copies(rt, host, hv, conn, sorted(uids))
    for uid, (found, volumes) in removed.items():
        async with st.lock(uid):
            vm = st.vms.get(uid)
            if vm is None:
                continue
            status = vm.get("status") or {}
            remaining = sorted(set(status.get(STALE_HOSTS) or []) - {host})
            meta = vm["metadata"]
            try:
                st.remember(await rt.kube.patch_status(PLURAL, meta["namespace"], meta["name"],
                                                       {STALE_HOSTS: remaining or None}))
            except AppError as err:
                log.info("could not clear a removed stale copy from the VM's status; next round", uid=uid,
                         host=host, code=err.code.value)
                continue
            if found:
                kopf.event(vm, type="Normal", reason="StaleCopyRemoved",
                           message=f"its stale domain on LibvirtHost {host} (left when the host was out of service) "
                                   "was powered off and undefined"
                                   + (f"; local volumes deleted: {', '.join(volumes)}" if volumes else ""))

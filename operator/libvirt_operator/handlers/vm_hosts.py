"""Per-host: lifecycle events + bulk look at the host's domains, feeding the VM work queue.

One daemon per LibvirtHost: subscribes (once per connection) to the host's domain lifecycle
events. An event marks its domain's VM dirty; within ~0.1 s a round asks the host ONE bulk
libvirt call and queues the dirty VMs (and those whose requeue is due) with what it saw
(`HostSighting`); their work items (handlers.vm_reconcile) refresh the status from it without
asking the host again. Every RESYNC_SECONDS a full sweep does the same for the host's VMs whose
domain changed (all of them every EVERYTHING_SECONDS) and checks for orphaned domains. A host that
cannot be listed queues its VMs with that error (power state Unknown). The round writes no VM
status itself; it removes the stale copies a fenced host left (and clears them from the VMs).
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
from ..reconcile.vm_failover import STALE_HOSTS, remove_stale_copies
from ..reconcile.runtime import Runtime
from .startup import runtime_of
from .vm_orphans import check_orphans
from .vm_state import BUSY_RETRY_SECONDS, PLURAL, HostSighting, VmState, state_of

log = get_logger(__name__)
RESYNC_SECONDS = 10.0                  # full sweep of a host's VMs: the safety net for lost events
EVERYTHING_SECONDS = 60.0              # … in which every VM is queued, changed or not
ORPHAN_CHECK_SECONDS = RESYNC_SECONDS  # free when every domain is accounted for
EVENT_DEBOUNCE_SECONDS = 0.1
HOST_RETRY_CAP_SECONDS = 60.0         # a host that does not answer: 5 s, 10 s, … (its probe's Ready change wakes)


@kopf.daemon(GROUP, VERSION, "libvirthosts", cancellation_timeout=5.0)
async def host_vm_sync(name: str, stopped: kopf.DaemonStopped, memo: kopf.Memo, **_: Any) -> None:
    rt = runtime_of(memo)
    st = state_of(rt)
    # Our own Event, not a shared one: a host deleted and re-created under the same name is two
    # objects to kopf, and the old one's daemon may still be winding down while the new one runs.
    wake = st.host_wake[name] = asyncio.Event()
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
                    st.swept_all.pop(name, None)
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
                    st.full_synced.pop(name, None)  # once it answers again, look at everything
                    st.swept_all.pop(name, None)
                    _report_host_lost(st, name, err)
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
        if st.host_wake.get(name) is wake:  # else a re-created host's daemon owns these now
            del st.host_wake[name]
            st.dirty.pop(name, None)
            st.full_synced.pop(name, None)
            st.swept_all.pop(name, None)
        if hooked is not None:
            with contextlib.suppress(ValueError):
                hooked.on_connect.remove(hook)


def _report_host_lost(st: VmState, host: str, err: AppError) -> None:
    """The host could not be listed: its VMs' power state is Unknown until it answers again. Their
    work items write that (`HostSighting.error`); VMs already shown Unknown are not queued again."""
    now = time.monotonic()
    for uid in sorted(st.on_host.get(host) or ()):
        vm = st.vms.get(uid)
        if vm is None or vm["metadata"].get("deletionTimestamp") \
                or (vm.get("status") or {}).get("printableStatus") == "Unknown":
            continue
        st.sighted(uid, HostSighting(host, now, error=err))


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

    The round asks the host ONE bulk list_domains (never one lookup per VM; a round with nothing to
    do asks nothing) and hands what it saw to the VMs' work items: it queues their keys with a
    `HostSighting` and writes no VM status itself. Which VMs: those named by lifecycle events since
    the last round (`st.dirty`) and those whose requeue deadline has passed; in a full sweep (every
    RESYNC_SECONDS, and after a (re)connect or a failed round) every VM of the host whose domain
    looks different from what its last sighting showed, and every EVERYTHING_SECONDS all of them."""
    now = time.monotonic()
    full = now - st.full_synced.get(host, -math.inf) >= RESYNC_SECONDS
    everything = full and now - st.swept_all.get(host, -math.inf) >= EVERYTHING_SECONDS
    # With the full sweep (same cadence), so a wake-up in between never costs a bulk call of its own.
    orphan_check_due = full or now - st.orphan_checked.get(host, 0.0) >= ORPHAN_CHECK_SECONDS
    dirty = st.dirty.pop(host, set())
    on_host = st.on_host.get(host) or set()
    named = {uid for uid in dirty if uid in on_host}
    named.update(uid for uid, deadline in st.requeue.items() if deadline <= now and uid in on_host)
    if full:
        st.full_synced[host] = now
        if everything:
            st.swept_all[host] = now
    targets = set(on_host) if full else named
    # VMs being deleted are their teardown's (their teardown events cost no round either).
    targets = {uid for uid in targets
               if (vm := st.vms.get(uid)) is not None and not vm["metadata"].get("deletionTimestamp")}
    stale = set(st.stale_on.get(host) or ())
    busy: set[str] = set()
    if targets or orphan_check_due or stale:
        started = time.perf_counter()
        if stale:  # copies of VMs that left this host while it was out of service: gone first
            await _remove_stale_copies(rt, st, host, conn, stale)
        observed = await conn.call("list_domains", domains.list_domains)
        taken = time.monotonic()
        st.domains_listed(host, conn, observed)  # what the placement search may skip (VmState.absent_from)
        if orphan_check_due:
            await check_orphans(rt, st, host, conn, observed)
        for uid in sorted(targets):
            vm = st.vms.get(uid)
            if vm is None or vm["metadata"].get("deletionTimestamp"):
                continue  # deleted while the host was listed (its teardown may even have ended)
            status = vm.get("status") or {}
            obs = observed.get(uid, ABSENT)
            if not obs.exists and (not status.get("domainUUID") or uid in st.parked):
                continue  # not defined yet: its work item (or its wait for what it needs) is on it
            if (lock := st.locks.get(uid)) is not None and lock.locked():
                # Someone acts on it right now: what we saw may predate that (the run would not use
                # it). Look again once they let go, rather than have the run ask the host itself.
                if uid in named:
                    busy.add(uid)
                continue
            if uid in named or everything or st.last_sighted.get(uid) != obs:
                st.requeue.pop(uid, None)  # its work item decides anew
                st.sighted(uid, HostSighting(host, taken, domain=obs))
        VM_RESYNC_SECONDS.labels(host).observe(time.perf_counter() - started)
        st.dirty_queue.worked(time.perf_counter() - started)
    if busy:
        st.dirty.setdefault(host, set()).update(busy)
    now = time.monotonic()
    waits = [RESYNC_SECONDS - (now - st.full_synced.get(host, now))]
    if busy:
        waits.append(BUSY_RETRY_SECONDS)
    for uid, deadline in st.requeue.items():
        if uid in on_host:
            # Due but not sighted (not defined yet): its work item is on it; not a busy loop.
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
            log.info("stale copy removed", kind="VirtualMachine", uid=uid, host=host, domain_found=found,
                     volumes=volumes, still_stale_on=remaining)
            if found:
                kopf.event(vm, type="Normal", reason="StaleCopyRemoved",
                           message=f"its stale domain on LibvirtHost {host} (left when the host was out of service) "
                                   "was powered off and undefined"
                                   + (f"; local volumes deleted: {', '.join(volumes)}" if volumes else ""))

"""The VM controller's per-process state: watch-fed views of LibvirtHosts, VirtualMachines and
ISOImages, the per-host indexes placement reads (reservations, VMs by host), and the bookkeeping
of the loops (dirty sets, requeue deadlines, parked VMs).

A placement decision is recorded here at once (before define/start), so concurrent placements never
share the same free capacity."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ..core.domain import DomainObservation
from ..core.errors import AppError, ErrorCode
from ..core.logs import get_logger
from ..core.workqueue import QueueMetrics
from ..reconcile import actions, plan
from ..reconcile.runtime import Runtime
from ..reconcile.tenancy import namespace_labels_of
from ..reconcile.vm_placement import record_placement
from ..reconcile.vm_types import ClusterView
from .requeue import Requeue
from .watch_copies import older, plain_copy

log = get_logger(__name__)
PLURAL = "virtualmachines"
BUSY_RETRY_SECONDS = 0.5               # a dirty VM a handler was working on is looked at again
RETRY_BASE_SECONDS = 2.0
RETRY_CAP_SECONDS = 60.0
# Called with the last body of a deleted VM and kopf's indexes, from the VM watch (one kopf handler per
# kind: each more one costs every watch event of every VM its own invocation). Other kinds' handlers
# register here.
VM_DELETED_HOOKS: list[Callable[[Runtime, Mapping[str, Any], Mapping[str, Any]], Awaitable[None]]] = []


@dataclasses.dataclass(frozen=True)
class HostSighting:
    """What a host round saw of one VM's domain, handed to the VM's next run with its key: the run
    uses it instead of asking the host again, if nothing acted on the VM since (`VmState.fresh`).
    `error`: the host could not be listed at all."""

    host: str
    taken_at: float                        # monotonic
    domain: DomainObservation | None = None
    error: AppError | None = None


class VmLock(asyncio.Lock):
    """The VM's lock (its work item, a migration, a snapshot or restore, an address refresh: whoever
    acts on its domain holds it), remembering when it was last released: a sighting taken before
    then may predate that holder's actions."""

    released_at = -math.inf

    def release(self) -> None:
        super().release()
        self.released_at = time.monotonic()


class VmState:
    """Per-process state of the VM controller (kept in Runtime.extras)."""

    def __init__(self) -> None:
        self.hosts: dict[str, dict[str, Any]] = {}
        self.vms: dict[str, dict[str, Any]] = {}           # uid → object
        self.isos: dict[tuple[str, str], dict[str, Any]] = {}
        self.locks: dict[str, VmLock] = {}
        self.sightings: dict[str, HostSighting] = {}       # uid → a host round's look, for its next run
        self.last_sighted: dict[str, DomainObservation] = {}  # uid → what the last sighting handed over saw
        self.requeue: dict[str, float] = {}                # uid → monotonic deadline
        self.host_wake: dict[str, asyncio.Event] = {}      # host → wake its daemon
        self.parked: dict[str, ErrorCode] = {}             # uid → what it waits for (placement/media/host)
        self.parked_wake = asyncio.Event()                 # a host or namespace changed: wake every parked VM
        self.media_wake = asyncio.Event()                  # an ISOImage changed: wake the VMs waiting for media
        self.retry = Requeue(RETRY_BASE_SECONDS, RETRY_CAP_SECONDS, name="virtualmachine")  # uid → next full reconcile
        self.queue_task: asyncio.Task[None] | None = None
        self.wake_task: asyncio.Task[None] | None = None
        self.hosts_loaded = False
        self.hosts_loading = asyncio.Lock()
        self.orphan_candidates: dict[str, set[str]] = {}   # host → owned, unaccounted domain uuids
        self.orphan_checked: dict[str, float] = {}         # host → monotonic time of the last check
        self.dirty: dict[str, set[str]] = {}               # host → uids named by lifecycle events
        self.dirty_queue = QueueMetrics("virtualmachine_events", lambda: sum(map(len, list(self.dirty.values()))))
        self.full_synced: dict[str, float] = {}            # host → monotonic time of the last full sweep
        self.swept_all: dict[str, float] = {}              # host → … of the last sweep that queued every VM
        # Indexes over `vms` (kept by `index`): uids by status.host, and reservations by host.
        self.on_host: dict[str, set[str]] = {}
        self.stale_on: dict[str, set[str]] = {}            # host → uids with a stale copy there (staleDomainHosts)
        self._stale_at: dict[str, frozenset[str]] = {}     # uid → its keys in stale_on
        self.reserved_on: dict[str, dict[str, plan.Reservation]] = {}
        self.pending: dict[str, plan.Reservation] = {}     # placement decisions (until the VM is gone)
        self._host_of: dict[str, str] = {}                 # uid → key in on_host
        self._reserved_at: dict[str, str] = {}             # uid → key in reserved_on
        # The placement search's shortcut (`absent_from`): each host's domain UUIDs as this process's
        # last bulk list saw them, with the connection they were listed over; and every VM this
        # process has seen placed (status.host, or its own placement decision).
        self.listed: dict[str, tuple[Any, frozenset[str]]] = {}
        self.ever_placed: set[str] = set()

    def lock(self, uid: str) -> VmLock:
        return self.locks.setdefault(uid, VmLock())

    def sighted(self, uid: str, sighting: HostSighting) -> None:
        """A host round's trigger: queue the VM's key with what the round saw."""
        self.sightings[uid] = sighting
        if sighting.domain is not None:
            self.last_sighted[uid] = sighting.domain
        self.retry.add(uid)

    def fresh(self, uid: str, vm: Mapping[str, Any], sighting: HostSighting | None) -> HostSighting | None:
        """The sighting, if the run may use it instead of asking the host: taken on the VM's host after
        anyone last acted on the VM, and the VM needs no more than a power-state refresh (no new
        generation; an action request or a waiting VM takes the full path)."""
        if sighting is None:
            return None
        meta, status = vm.get("metadata") or {}, vm.get("status") or {}
        lock = self.locks.get(uid)
        if (status.get("host") != sighting.host
                or (lock is not None and sighting.taken_at <= lock.released_at)
                or int(meta.get("generation") or 0) != int(status.get("observedGeneration") or 0)
                or uid in self.parked
                or actions.pending_request(meta.get("annotations"), status.get("lastAction")) is not None):
            return None
        return sighting

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
            self.ever_placed.add(uid)
        for name in self._stale_at.pop(uid, frozenset()):
            self.stale_on.get(name, set()).discard(uid)
        stale = frozenset((vm.get("status") or {}).get("staleDomainHosts") or []) if vm is not None else frozenset()
        if stale:
            self._stale_at[uid] = stale
            for name in stale:
                self.stale_on.setdefault(name, set()).add(uid)
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
            self.ever_placed.add(uid)

    def forget(self, uid: str) -> None:
        """The VirtualMachine is gone."""
        self.vms.pop(uid, None)
        self.pending.pop(uid, None)
        self.locks.pop(uid, None)
        self.sightings.pop(uid, None)
        self.last_sighted.pop(uid, None)
        self.requeue.pop(uid, None)
        self.parked.pop(uid, None)
        self.retry.forget(uid)
        self.index(uid)
        self.ever_placed.discard(uid)  # a uid is never reused: no placement of it follows

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

    def domains_listed(self, host: str, conn: Any, observed: Mapping[str, Any]) -> None:
        """A bulk list_domains of `host` over `conn` (handlers.vm_hosts' round): what `absent_from` reads."""
        self.listed[host] = (conn, frozenset(observed))

    def absent_from(self, rt: Runtime | None, host: str, uid: str) -> bool:
        """True when it is certain, without asking the host, that no domain with UUID `uid` is on
        `host`; False when only libvirt can tell (the placement search then asks it: get_domain).

        Why this process's last bulk list of the host is enough for a VM it has never seen placed:
        the placement search looks for a domain that exists although the VM's status does not name
        its host. Only a placement of this VM can have defined it (the domain UUID is the VM's
        metadata.uid, never reused), and every placement is recorded in status before its define.
        - A placement by an earlier operator process defined it before this process started (the
          leader lease: an earlier leader exits before another one may act), hence before any list
          this process took: every list of ours shows it.
        - A placement by this process goes through `placed` (and its status through `index`) before
          any define or migration of the VM, so `ever_placed` has the uid, and for such a VM every
          candidate host is asked whatever its list showed (a status wiped since, a failover, a
          migration target). A list racing with our own define does not matter for that reason.
          One worker per key: no concurrent placement of the same VM either.
        - The list must have been taken over the host's current connection: a changed URI or
          credentials make a new HostConnection (maybe another machine), not trusted until listed.
          A reconnect of the same connection reaches the same libvirtd, whose persistent domains do
          not change by reconnecting.
        - A host this process has not listed yet (just added, or a VM reconciled before the host's
          first round after a start-up) is asked.
        A UUID the list does show is asked too (it may be gone since; its power state decides)."""
        if rt is None or uid in self.ever_placed:
            return False
        listed = self.listed.get(host)
        return listed is not None and listed[0] is rt.pool.get(host) and uid not in listed[1]

    def host_replaced(self, name: str, body: Mapping[str, Any]) -> bool:
        """The view holds another LibvirtHost object of this name than `body`: one re-created since
        (kopf handles each object apart, so the old one's deletion may be processed after it came)."""
        seen = self.hosts.get(name)
        return seen is not None and (seen.get("metadata") or {}).get("uid") != (body.get("metadata") or {}).get("uid")

    def wake_host(self, host: str | None) -> None:
        if host and host in self.host_wake:
            self.host_wake[host].set()

    def view(self, rt: Runtime | None = None) -> ClusterView:
        return ClusterView(hosts=self.hosts, vms=lambda: list(self.vms.values()),
                           iso=lambda ns, name: self.isos.get((ns, name)),
                           reserved=self.reserved, placed=self.placed,
                           namespace_labels=namespace_labels_of(rt).get if rt is not None else None,
                           record_placement=(lambda body, placed: self.record_placement(rt, body, placed))
                           if rt is not None else None,
                           absent_from=(lambda host, uid: self.absent_from(rt, host, uid)) if rt is not None else None)

    async def record_placement(self, rt: Runtime, body: Mapping[str, Any], placed: dict[str, Any]) -> str:
        """reconcile.vm_placement.record_placement, then the cache shows the object as written (status and
        resourceVersion), so the next write's precondition is not stale because of our own write."""
        host, obj = await record_placement(rt, body, placed)
        self.remember(obj)
        return host

    def remember(self, obj: Mapping[str, Any] | None) -> None:
        """An object we just wrote (or read) is newer than the cache until the watch delivers it."""
        if obj is None:
            return
        meta = obj.get("metadata") or {}
        cached = self.vms.get(meta.get("uid", ""))
        if cached is None or older(obj, cached):  # the watch was faster than the write's answer
            return
        cached["status"] = dict(obj.get("status") or {})
        cached["metadata"]["resourceVersion"] = meta.get("resourceVersion")
        self.index(meta["uid"])


def state_of(rt: Runtime) -> VmState:
    state = rt.extras.get("vm")
    if state is None:
        state = rt.extras["vm"] = VmState()
    return state


async def load_hosts(rt: Runtime, st: VmState) -> None:
    """At start-up the VM watch may deliver before the host watch: list hosts once."""
    if st.hosts_loaded:
        return
    async with st.hosts_loading:  # every caller waits for the one list: none sees a half-filled map
        if st.hosts_loaded:
            return
        try:
            objs = await rt.kube.list_objects("libvirthosts")
        except AppError as err:  # not loaded: the next caller lists again
            log.info("listing LibvirtHosts failed", kind="LibvirtHost", code=err.code.value, error=err.message)
            return
        for obj in objs:
            st.hosts.setdefault(obj["metadata"]["name"], plain_copy(obj))
        st.hosts_loaded = True


def vm_log_fields(vm: Mapping[str, Any]) -> dict[str, Any]:
    """Log fields naming a VM, for lines logged outside a kopf handler (loops)."""
    meta = vm.get("metadata") or {}
    return {"kind": "VirtualMachine", "namespace": meta.get("namespace"), "name": meta.get("name"),
            "uid": meta.get("uid")}

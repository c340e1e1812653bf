"""The VM reconcile's inputs and results: the in-memory cluster view it reads (filled by handlers), the
outcomes it returns, and how far a reconcile got (so an error maps to the right status)."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ..core.domain import DomainObservation
from ..core.errors import AppError
from . import plan

Event = tuple[str, str, str]  # type, reason, message


@dataclasses.dataclass
class ClusterView:
    """The operator's in-memory view of the objects a VM reconcile needs (filled by handlers)."""

    hosts: Mapping[str, Mapping[str, Any]]                        # LibvirtHost name → object
    vms: Callable[[], list[Mapping[str, Any]]] = lambda: []       # all VirtualMachines (reservations)
    iso: Callable[[str, str], Mapping[str, Any] | None] = lambda _ns, _name: None
    # Reservations on these hosts, except the given VM's own (an index kept by the caller); None:
    # computed from `vms()` (O(all VMs) per placement).
    reserved: Callable[[list[str], str], list[plan.Reservation]] | None = None
    # Told about each placement decision right after it is made (before any await), so the next
    # placement counts it even though the VM's status does not show the host yet.
    placed: Callable[[str, plan.Reservation | None], None] = lambda _uid, _reservation: None
    # A namespace's labels (for LibvirtHost namespaceSelector); None when unknown. Read only when a
    # host's selector has to decide.
    namespace_labels: Callable[[str], Awaitable[Mapping[str, str] | None]] | None = None
    # Records a placement (status.host + Scheduled) before anything is created on the host, with
    # the object's resourceVersion as precondition; returns the host the VM's status names
    # afterwards (ours, or one another writer recorded first). None: nothing is recorded ahead
    # (callers outside the operator, e.g. tests driving sync_vm directly).
    record_placement: Callable[[Mapping[str, Any], dict[str, Any]], Awaitable[str]] | None = None
    # (host, uid) → True when it is certain without asking libvirt that no domain of that UUID is on
    # the host (handlers.vm_state.VmState.absent_from says why that can be known); None: always ask.
    absent_from: Callable[[str, str], bool] | None = None

    async def labels_if_needed(self, hosts: list[plan.HostView], namespace: str) -> Mapping[str, str] | None:
        if self.namespace_labels is None or not plan.needs_namespace_labels(hosts, namespace):
            return None
        return await self.namespace_labels(namespace)

    def reservations_for(self, hosts: list[str], uid: str) -> list[plan.Reservation]:
        if not hosts:
            return []
        if self.reserved is not None:
            return self.reserved(hosts, uid)
        wanted = set(hosts)
        return [r for r in plan.reservations(self.vms(), exclude_uid=uid) if r.host in wanted]


@dataclasses.dataclass
class VmOutcome:
    status: dict[str, Any]
    events: list[Event]
    error: AppError | None = None
    requeue_after: float | None = None

    @property
    def retry(self) -> bool:
        return self.error is not None and self.error.retryable


@dataclasses.dataclass
class DeleteOutcome:
    released: bool
    status: dict[str, Any] | None
    events: list[Event]
    error: AppError | None = None


class Stage:
    """Where a reconcile got to, so an error maps to the right printable status and conditions."""

    def __init__(self) -> None:
        self.placed = False
        self.waiting_media = False
        self.start_failed = False
        # Placed, but the host no longer admits the VM (tenancy): the domain as it is, left alone.
        self.refused: DomainObservation | None = None
        # Placed just now on a host the placement search knows has no domain of this VM (asked, or its
        # bulk list proved it): the full path need not look it up before defining (only this VM's one
        # worker defines its UUID, and it is here).
        self.placed_fresh = False

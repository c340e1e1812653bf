"""Pure planning for VirtualMachines: placement, power state, backoff, printable status, redefinition.

No I/O, no kopf, no libvirt (enforced by .importlinter): every function takes plain data and a
`now`, so each decision is unit-testable and deterministic.

This module gathers the planning modules' public names, so callers keep writing `plan.choose_host`:
  plan_hosts      a LibvirtHost as placement sees it (HostView), hostRef/hostSelector matching
  plan_capacity   reservations and free capacity
  plan_tenancy    which namespaces, pools and networks a host admits
  plan_placement  choose_host
  plan_failover   whether a VM leaves an out-of-service host (hostFailurePolicy)
  plan_power      run strategies, power plan, crash-loop backoff, printable status
  plan_redefine   domain type, (re)definition
"""

from __future__ import annotations

from .plan_hosts import HostView, matches_selector
from .plan_capacity import (
    NOT_RUNNING_SOON, Reservation, capacity_hosts, free_resources, placement_reservation, reservation_of,
    reservations, vm_resources,
)
from .plan_tenancy import (
    admits_namespace, host_denial, image_denial, namespace_denial, needs_namespace_labels, pool_allowed,
    pool_denial, pools_of,
)
from .plan_placement import Placement, choose_host
from .plan_failover import Failover, disk_pools, plan_failover
from .plan_power import (
    Action, BACKOFF_BASE_SECONDS, BACKOFF_CAP_SECONDS, PowerPlan, PowerStatus, STABLE_RUN_SECONDS,
    STALLED_AFTER_FAILURES, crash_looping_stalled, desired_running, eject_media_now, plan_power,
    printable_status, record_start_failure, start_backoff,
)
from .plan_redefine import RedefinePlan, domain_type_for, plan_redefine

__all__ = [
    "HostView",
    "matches_selector",
    "NOT_RUNNING_SOON",
    "Reservation",
    "capacity_hosts",
    "free_resources",
    "placement_reservation",
    "reservation_of",
    "reservations",
    "vm_resources",
    "admits_namespace",
    "host_denial",
    "image_denial",
    "namespace_denial",
    "needs_namespace_labels",
    "pool_allowed",
    "pool_denial",
    "pools_of",
    "Placement",
    "choose_host",
    "Failover",
    "disk_pools",
    "plan_failover",
    "Action",
    "BACKOFF_BASE_SECONDS",
    "BACKOFF_CAP_SECONDS",
    "PowerPlan",
    "PowerStatus",
    "STABLE_RUN_SECONDS",
    "STALLED_AFTER_FAILURES",
    "crash_looping_stalled",
    "desired_running",
    "eject_media_now",
    "plan_power",
    "printable_status",
    "record_start_failure",
    "start_backoff",
    "RedefinePlan",
    "domain_type_for",
    "plan_redefine",
]

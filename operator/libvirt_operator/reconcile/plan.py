"""Pure planning for VirtualMachines: placement, power state, backoff, printable status, redefinition.

No I/O, no kopf, no libvirt (enforced by .importlinter): every function takes plain data and a
`now`, so each decision is unit-testable and deterministic.

Run strategies follow KubeVirt:
  Always          keep running; restart after any stop (crashes back off: CrashLoopBackOff).
  Halted          keep stopped: graceful shutdown, power off after the grace period.
  Manual          start once when created, then never touch the power state again.
  RerunOnFailure  start once; restart after a failure (crash, external power-off), with backoff;
                  a clean guest shutdown stays stopped.
  Once            start once; whatever way it stops, never restart.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import math
from collections.abc import Iterable, Mapping
from typing import Any

from ..core.api.host import LabelSelector, LabelSelectorRequirement
from ..core.api.vm import StartFailure, VirtualMachineSpec
from ..core.domain import DomainObservation, PowerState, StopCause
from ..core.errors import AppError, ErrorCode
from ..core.labels import labels_match, selector_text
from ..core.quantity import parse_quantity
from ..core.timestamps import parse_time, timestamp

# A run at least this long is "stable": it resets the crash-loop counter.
STABLE_RUN_SECONDS = 60.0
BACKOFF_BASE_SECONDS = 10.0
BACKOFF_CAP_SECONDS = 300.0
# After this many failed runs in a row the VM is Stalled (kstatus Failed: GitOps tools stop waiting
# and report it) while the backoff keeps retrying; a stable run clears it.
STALLED_AFTER_FAILURES = 3


# --------------------------------------------------------------------------------------------
# Placement
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HostView:
    """What placement needs to know about a LibvirtHost."""

    name: str
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ready: bool = False
    cpus: int = 0
    memory_bytes: int = 0
    allocated_cpus: int = 0
    allocated_memory_bytes: int = 0
    domain_types: tuple[str, ...] = ()
    default_pool: str = "default"
    deleting: bool = False
    last_probe_time: dt.datetime | None = None  # when `allocated` was measured
    # Tenancy (LibvirtHost spec): None = unrestricted.
    allowed_namespaces: frozenset[str] | None = None
    namespace_selector: LabelSelector | None = None
    allowed_pools: frozenset[str] | None = None
    allowed_networks: frozenset[str] | None = None
    allowed_bridges: frozenset[str] | None = None
    cpu_allocation_ratio: float = 4.0      # LibvirtHost spec (overcommit)
    memory_allocation_ratio: float = 1.0

    @property
    def allocatable_cpus(self) -> int:
        """What placement may promise: capacity × allocation ratio."""
        return math.floor(self.cpus * self.cpu_allocation_ratio)

    @property
    def allocatable_memory_bytes(self) -> int:
        return math.floor(self.memory_bytes * self.memory_allocation_ratio)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> HostView:
        """Parse a LibvirtHost object (as the API returns it)."""
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in status.get("conditions") or [])
        capacity = status.get("capacity") or {}
        allocated = status.get("allocated") or {}
        return cls(
            name=meta.get("name", ""),
            labels=dict(meta.get("labels") or {}),
            ready=ready,
            cpus=int(capacity.get("cpus") or 0),
            memory_bytes=_bytes(capacity.get("memory")),
            allocated_cpus=int(allocated.get("cpus") or 0),
            allocated_memory_bytes=_bytes(allocated.get("memory")),
            domain_types=tuple(status.get("domainTypes") or ()),
            default_pool=spec.get("defaultPool") or "default",
            deleting=bool(meta.get("deletionTimestamp")),
            last_probe_time=parse_time(status.get("lastProbeTime")),
            allowed_namespaces=_name_set(spec.get("allowedNamespaces")),
            namespace_selector=_selector(spec.get("namespaceSelector")),
            allowed_pools=_name_set(spec.get("allowedPools")),
            allowed_networks=_name_set(spec.get("allowedNetworks")),
            allowed_bridges=_name_set(spec.get("allowedBridges")),
            cpu_allocation_ratio=_ratio(spec.get("cpuAllocationRatio"), 4.0),
            memory_allocation_ratio=_ratio(spec.get("memoryAllocationRatio"), 1.0),
        )

    @property
    def restricts_namespaces(self) -> bool:
        return self.allowed_namespaces is not None or self.namespace_selector is not None


def _ratio(value: Any, default: float) -> float:
    try:
        ratio = float(value) if value is not None else default
    except (TypeError, ValueError):
        return default
    return ratio if ratio > 0 else default


def _name_set(value: Any) -> frozenset[str] | None:
    return None if value is None else frozenset(str(v) for v in value)


def _selector(value: Any) -> LabelSelector | None:
    if value is None:
        return None
    try:
        return LabelSelector.model_validate(value)
    except ValueError:
        # The CRD schema validates selectors; one it let through but we cannot read matches nothing.
        return _MATCH_NOTHING


_MATCH_NOTHING = LabelSelector(match_expressions=[LabelSelectorRequirement(key="-", operator="In", values=[])])


def _bytes(value: Any) -> int:
    if value in (None, ""):
        return 0
    try:
        return parse_quantity(value)
    except ValueError:
        return 0


@dataclasses.dataclass(frozen=True)
class Reservation:
    """Resources promised to a VM placed on a host that the host's `allocated` may not include yet:
    not running, or started after the host was last probed (`started`)."""

    host: str
    cpus: int
    memory_bytes: int
    uid: str = ""
    started: dt.datetime | None = None  # None: not running


@dataclasses.dataclass(frozen=True)
class Placement:
    host: str | None
    error: AppError | None = None
    free_cpus: int | None = None
    free_memory_bytes: int | None = None


def vm_resources(spec: VirtualMachineSpec) -> tuple[int, int]:
    return spec.cpu, parse_quantity(spec.memory)


# Placed VMs that are not about to run: they hold no reservation (their domain, if any, is not
# running, and the host's `allocated` counts whatever does run).
NOT_RUNNING_SOON = frozenset({"Stopped", "WaitingForMedia", "ErrorUnschedulable", "CrashLoopBackOff", "Unknown",
                              "Terminating"})


def reservation_of(vm: Mapping[str, Any]) -> Reservation | None:
    """The reservation one VirtualMachine object holds, or None: not placed (status.host), being
    deleted, stopped on purpose (Halted, or a finished run), or not able to run now (waiting for
    media, crash-looping, blocked by an error): only what should be running is counted, so VMs that
    never start cannot eat a host's capacity forever. A running VM carries its start time so
    `free_resources` counts it only until a host probe has seen it."""
    meta = vm.get("metadata") or {}
    status = vm.get("status") or {}
    spec = vm.get("spec") or {}
    if meta.get("deletionTimestamp") or not status.get("host"):
        return None
    printable = status.get("printableStatus")
    if spec.get("runStrategy") == "Halted" or printable in NOT_RUNNING_SOON:
        return None
    if status.get("error") and printable not in ("Running", "Paused", "Stopping"):
        return None  # provisioning failed (a pool, the host, the spec): it waits, it does not run
    running = printable in ("Running", "Paused", "Stopping")
    started = parse_time(status.get("lastStartTime") or status.get("firstBootTime")) if running else None
    if running and started is None:
        return None
    try:
        memory = parse_quantity(spec.get("memory") or "512Mi")
    except ValueError:
        return None
    return Reservation(status["host"], int(spec.get("cpu") or 1), memory, meta.get("uid", ""), started)


def placement_reservation(spec: VirtualMachineSpec, host: str, uid: str) -> Reservation | None:
    """What a placement decision reserves on its host until the VM's status shows it placed: the
    VM's resources, not running yet. None for a Halted VM (it will not run)."""
    if spec.run_strategy == "Halted":
        return None
    cpus, memory = vm_resources(spec)
    return Reservation(host, cpus, memory, uid, None)


def reservations(vms: Iterable[Mapping[str, Any]], exclude_uid: str | None = None) -> list[Reservation]:
    """Reservations from VirtualMachine objects (see `reservation_of`). O(all VMs): the operator
    keeps them indexed by host instead (handlers.vm); this is the stateless fallback."""
    result = []
    for vm in vms:
        if (vm.get("metadata") or {}).get("uid") == exclude_uid:
            continue
        r = reservation_of(vm)
        if r is not None:
            result.append(r)
    return result


def capacity_hosts(spec: VirtualMachineSpec, hosts: Iterable[HostView]) -> list[str]:
    """Hosts whose reservations a placement of this VM reads: the Ready, matching ones. Empty for
    a hostRef pin: its capacity is not checked, so it needs no reservations at all."""
    if spec.host_ref is not None:
        return []
    return [h.name for h in hosts if h.ready and not h.deleting and matches_selector(h, spec)]


def free_resources(host: HostView, reserved: Iterable[Reservation]) -> tuple[int, int]:
    """free = capacity × allocation ratio − allocated (running domains at the last probe) −
    reservations (placed VMs about to run, or started after that probe). Negative when pinned VMs
    overcommit the host; messages show at least 0."""
    cpus = host.allocatable_cpus - host.allocated_cpus
    memory = host.allocatable_memory_bytes - host.allocated_memory_bytes
    for r in reserved:
        if r.host != host.name:
            continue
        if r.started is not None and host.last_probe_time is not None and r.started < host.last_probe_time:
            continue  # already in `allocated`
        cpus -= r.cpus
        memory -= r.memory_bytes
    return cpus, memory


def matches_selector(host: HostView, spec: VirtualMachineSpec) -> bool:
    if spec.host_ref is not None:
        return host.name == spec.host_ref
    return labels_match(spec.host_selector.match_labels if spec.host_selector else None, host.labels)


# --------------------------------------------------------------------------------------------
# Tenancy: which namespaces a host admits, and which pools / networks / bridges it exposes
# --------------------------------------------------------------------------------------------

def admits_namespace(host: HostView, namespace: str, namespace_labels: Mapping[str, str] | None) -> bool:
    """Neither allowedNamespaces nor namespaceSelector set: every namespace (back-compat). Else the
    namespace must be listed or its labels match the selector. Unknown labels (None) match no selector."""
    if not host.restricts_namespaces:
        return True
    if host.allowed_namespaces is not None and namespace in host.allowed_namespaces:
        return True
    return (host.namespace_selector is not None and namespace_labels is not None
            and host.namespace_selector.matches(namespace_labels))


def pools_of(spec: VirtualMachineSpec, host: HostView) -> list[str]:
    """The storage pools the VM's new volumes go to on this host, and those its base images are in."""
    pools = {d.volume.pool or host.default_pool for d in spec.disks if d.volume is not None}
    pools.update(d.volume.source.volume.pool for d in spec.disks if d.volume is not None and d.volume.source)
    return sorted(pools)


def pool_allowed(host: HostView, pool: str) -> bool:
    """allowedPools unset: any pool; set: those and defaultPool."""
    return host.allowed_pools is None or pool == host.default_pool or pool in host.allowed_pools


def _listed(allowed: frozenset[str] | None) -> str:
    return ", ".join(sorted(allowed)) if allowed else "none"


def namespace_denial(host: HostView, namespace: str, namespace_labels: Mapping[str, str] | None) -> AppError | None:
    if admits_namespace(host, namespace, namespace_labels):
        return None
    how = []
    if host.allowed_namespaces is not None:
        how.append(f"allowedNamespaces: {_listed(host.allowed_namespaces)}")
    if host.namespace_selector is not None:
        how.append("namespaceSelector does not match the namespace's labels")
    return AppError(ErrorCode.NAMESPACE_NOT_ALLOWED,
                    f"LibvirtHost {host.name} does not admit namespace {namespace} ({'; '.join(how)})",
                    {"host": host.name, "namespace": namespace})


def pool_denial(host: HostView, pool: str, namespace: str, what: str = "VMs") -> AppError | None:
    if pool_allowed(host, pool):
        return None
    return AppError(ErrorCode.POOL_NOT_ALLOWED,
                    f"LibvirtHost {host.name} does not expose storage pool {pool} to {what} (allowedPools: "
                    f"{_listed(host.allowed_pools)}; defaultPool {host.default_pool} is always allowed)",
                    {"host": host.name, "pool": pool, "namespace": namespace})


def host_denial(spec: VirtualMachineSpec, host: HostView, namespace: str,
                namespace_labels: Mapping[str, str] | None) -> AppError | None:
    """Why this host refuses this VM (namespace first, then pools, networks, bridges), or None."""
    denial = namespace_denial(host, namespace, namespace_labels)
    if denial is not None:
        return denial
    for pool in pools_of(spec, host):
        denial = pool_denial(host, pool, namespace)
        if denial is not None:
            return denial
    for iface in spec.interfaces:
        allowed = {"network": host.allowed_networks, "bridge": host.allowed_bridges}.get(iface.type)
        if allowed is not None and iface.source not in allowed:
            field = "allowedNetworks" if iface.type == "network" else "allowedBridges"
            return AppError(ErrorCode.NETWORK_NOT_ALLOWED,
                            f"LibvirtHost {host.name} does not expose {iface.type} {iface.source} (interface "
                            f"{iface.name}) to VMs ({field}: {_listed(allowed)})",
                            {"host": host.name, iface.type: iface.source or "", "interface": iface.name,
                             "namespace": namespace})
    return None


def image_denial(host: HostView, namespace: str, namespace_labels: Mapping[str, str] | None,
                 pool: str) -> AppError | None:
    """Why this host refuses an ISOImage of this namespace into this pool, or None."""
    return namespace_denial(host, namespace, namespace_labels) or pool_denial(host, pool, namespace, "ISOImages")


def needs_namespace_labels(hosts: Iterable[HostView], namespace: str) -> bool:
    """Whether deciding on these hosts reads the namespace's labels (a selector that a listing
    does not already settle)."""
    return any(h.namespace_selector is not None and not (h.allowed_namespaces and namespace in h.allowed_namespaces)
               for h in hosts)


def choose_host(spec: VirtualMachineSpec, hosts: Iterable[HostView],
                reserved: Iterable[Reservation] = (), namespace: str = "",
                namespace_labels: Mapping[str, str] | None = None) -> Placement:
    """Pick a Ready host matching hostSelector with room for the VM; most free memory wins
    (then most free CPUs, then name, so the choice is deterministic). No fit → a Placement whose
    error is HOST_NOT_FOUND (hostRef names no host), NO_SCHEDULABLE_HOST (no Ready host matches) or
    INSUFFICIENT_RESOURCES (matching hosts are full). hostRef pins: the host must exist and be Ready,
    capacity is not checked."""
    hosts = list(hosts)
    by_host: dict[str, list[Reservation]] = {}
    for r in reserved:  # grouped once: O(reservations + hosts), not O(reservations × hosts)
        by_host.setdefault(r.host, []).append(r)
    cpus, memory = vm_resources(spec)
    if spec.host_ref is not None and not any(h.name == spec.host_ref for h in hosts):
        return Placement(None, AppError(ErrorCode.HOST_NOT_FOUND,
                                        f"LibvirtHost {spec.host_ref} named by hostRef does not exist",
                                        {"host": spec.host_ref}))
    matching = [h for h in hosts if matches_selector(h, spec)]
    # Tenancy before readiness: a host that refuses the VM is no candidate, Ready or not.
    denials = {h.name: host_denial(spec, h, namespace, namespace_labels) for h in matching}
    if matching and all(d is not None for d in denials.values()):
        if spec.host_ref is not None:
            return Placement(None, denials[spec.host_ref])
        first = min((d for d in denials.values() if d is not None),
                    key=lambda d: _TENANCY_ORDER.index(d.code))
        names = sorted(denials)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return Placement(None, AppError(
            first.code, f"none of the {len(names)} LibvirtHost(s) {_placement_scope(spec)} admits this VM "
                        f"({shown}); e.g. {first.message}",
            {**first.context, "matchingHosts": len(names)}))
    matching = [h for h in matching if denials[h.name] is None]
    candidates = [h for h in matching if h.ready and not h.deleting]
    if not candidates:
        if spec.host_ref is not None:
            what = f"LibvirtHost {spec.host_ref} is not Ready"
        elif spec.host_selector and spec.host_selector.match_labels:
            what = (f"no Ready LibvirtHost matches hostSelector {selector_text(spec.host_selector.match_labels)} "
                    f"({len(matching)} match, none Ready)")
        else:
            what = "no LibvirtHost is Ready"
        return Placement(None, AppError(ErrorCode.NO_SCHEDULABLE_HOST, what,
                                        {"matchingHosts": len(matching)}))
    if spec.host_ref is not None:
        # An explicit pin (like a pod's nodeName) skips the capacity check: libvirt hosts are often
        # overcommitted on purpose, and the user chose this host.
        host = candidates[0]
        free_cpu, free_mem = free_resources(host, by_host.get(host.name, ()))
        return Placement(host.name, None, free_cpu, free_mem)
    fits: list[tuple[int, int, HostView]] = []
    best_free: tuple[int, int] | None = None
    for host in candidates:
        free_cpu, free_mem = free_resources(host, by_host.get(host.name, ()))
        if best_free is None or (free_mem, free_cpu) > best_free:
            best_free = (free_mem, free_cpu)
        if free_cpu >= cpus and free_mem >= memory:
            fits.append((free_mem, free_cpu, host))
    if not fits:
        assert best_free is not None
        return Placement(None, AppError(
            ErrorCode.INSUFFICIENT_RESOURCES,
            f"none of {len(candidates)} matching Ready hosts has {cpus} CPUs and {memory // 2**20} MiB free "
            f"(most free: {max(0, best_free[1])} CPUs, {max(0, best_free[0]) // 2**20} MiB, after the hosts' "
            "allocation ratios)",
            {"cpus": cpus, "memoryMiB": memory // 2**20, "candidates": len(candidates)}))
    fits.sort(key=lambda f: (-f[0], -f[1], f[2].name))
    free_mem, free_cpu, host = fits[0]
    return Placement(host.name, None, free_cpu, free_mem)


_TENANCY_ORDER = (ErrorCode.NAMESPACE_NOT_ALLOWED, ErrorCode.POOL_NOT_ALLOWED, ErrorCode.NETWORK_NOT_ALLOWED)


def _placement_scope(spec: VirtualMachineSpec) -> str:
    if spec.host_selector and spec.host_selector.match_labels:
        return "matching hostSelector " + selector_text(spec.host_selector.match_labels)
    return "in the cluster"


def domain_type_for(requested: str, host_domain_types: Iterable[str], previous: str | None = None) -> str:
    """kvm/qemu for a spec's domainType. auto: kvm when the host offers it, else qemu; once chosen
    (status.domainType) auto keeps its choice so a host probe never flips a VM's type."""
    if requested in ("kvm", "qemu"):
        types = tuple(host_domain_types)
        if requested == "kvm" and types and "kvm" not in types:
            raise AppError(ErrorCode.HYPERVISOR_UNSUPPORTED,
                           "domainType kvm requested but the host offers no usable KVM "
                           f"(domain types: {', '.join(types)})", {"domainType": requested})
        return requested
    if previous in ("kvm", "qemu"):
        return previous
    return "kvm" if "kvm" in host_domain_types else "qemu"


# --------------------------------------------------------------------------------------------
# Power state
# --------------------------------------------------------------------------------------------

class Action(str, enum.Enum):
    NONE = "None"
    START = "Start"
    SHUTDOWN = "Shutdown"    # graceful (ACPI)
    DESTROY = "Destroy"      # power off


@dataclasses.dataclass(frozen=True)
class PowerStatus:
    """The status fields the power plan reads and writes."""

    first_boot_time: dt.datetime | None = None
    last_start_time: dt.datetime | None = None
    stop_requested_time: dt.datetime | None = None
    start_failure: StartFailure | None = None


@dataclasses.dataclass(frozen=True)
class PowerPlan:
    action: Action
    desired_running: bool | None        # None: leave as is (Manual after first start)
    status: PowerStatus                 # the power fields to record
    printable: str
    ready: bool
    reason: str
    message: str
    requeue_after: float | None = None  # seconds until the plan may change by itself


def start_backoff(consecutive_failures: int) -> float:
    """KubeVirt-like crash-loop backoff: 10 s, 20 s, 40 s, … capped at 5 min."""
    return min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** max(0, consecutive_failures - 1))


def record_start_failure(previous: StartFailure | None, now: dt.datetime,
                         last_start: dt.datetime | None = None) -> StartFailure:
    """One more failure: the counter grows unless the last run was stable (then it restarts at 1)."""
    count = previous.consecutive_fail_count if previous else 0
    if last_start is not None and (now - last_start).total_seconds() >= STABLE_RUN_SECONDS:
        count = 0
    count += 1
    return StartFailure(consecutive_fail_count=count,
                        retry_after=now + dt.timedelta(seconds=start_backoff(count)))


def crash_looping_stalled(failure: StartFailure | None) -> bool:
    """Failed often enough in a row to report Stalled=True (and no longer Reconciling) while retrying."""
    return failure is not None and failure.consecutive_fail_count >= STALLED_AFTER_FAILURES


def _failed(observed: DomainObservation, stop_requested: bool) -> bool:
    if observed.state is PowerState.CRASHED:
        return True
    if stop_requested:
        return False
    return observed.state is PowerState.SHUTOFF and observed.stop_cause in (StopCause.FAILURE, StopCause.DESTROYED)


def desired_running(run_strategy: str, observed: DomainObservation, power: PowerStatus) -> bool | None:
    """True: should run; False: should be off; None: leave the power state alone."""
    never_started = power.first_boot_time is None
    running = observed.state in (PowerState.RUNNING, PowerState.PAUSED, PowerState.SHUTTING_DOWN)
    if run_strategy == "Always":
        return True
    if run_strategy == "Halted":
        return False
    if run_strategy == "Manual":
        return True if never_started else None
    if run_strategy == "Once":
        return True if never_started or running else False
    if run_strategy == "RerunOnFailure":
        if never_started or running:
            return True
        return _failed(observed, power.stop_requested_time is not None)
    raise ValueError(f"unknown runStrategy {run_strategy!r}")


def plan_power(run_strategy: str, observed: DomainObservation, power: PowerStatus, now: dt.datetime,
               grace_seconds: float = 60.0) -> PowerPlan:
    """Next power action and the power part of the status, from the runStrategy, what libvirt
    reports and what the status remembers. `observed` must describe a defined domain
    (ABSENT counts as off: the caller defines the domain first)."""
    state = observed.state
    requeue: list[float] = []

    # 1. Bookkeeping of what happened since the last look.
    first_boot, last_start, stop_req, failure = (power.first_boot_time, power.last_start_time,
                                                 power.stop_requested_time, power.start_failure)
    off = state in (PowerState.SHUTOFF, PowerState.ABSENT, PowerState.CRASHED)
    if state is PowerState.RUNNING:
        first_boot = first_boot or now
        last_start = last_start or now
        if failure is not None:
            ran = (now - last_start).total_seconds()
            if ran >= STABLE_RUN_SECONDS:
                failure = None
            else:
                requeue.append(STABLE_RUN_SECONDS - ran)
    if off and last_start is not None:
        # A run ended: count it as a failure or not (exactly once: last_start is cleared).
        if (now - last_start).total_seconds() >= STABLE_RUN_SECONDS:
            failure = None  # a failure after a stable run is not a crash loop: no backoff
        elif _failed(observed, stop_req is not None):
            failure = record_start_failure(failure, now, last_start)
        last_start = None
    if off:
        stop_req = None

    bookkept = PowerStatus(first_boot, last_start, stop_req, failure)
    want = desired_running(run_strategy, observed, bookkept)

    def plan(action: Action, printable: str, ready: bool, reason: str, message: str,
             status: PowerStatus = bookkept) -> PowerPlan:
        return PowerPlan(action, want, status, printable, ready, reason, message,
                         min(requeue) if requeue else None)

    if state is PowerState.UNKNOWN:
        return plan(Action.NONE, "Unknown", False, "Unknown", "libvirt reports an unknown domain state")

    if want is None:  # Manual after the first start: report, never act
        if state is PowerState.RUNNING:
            return plan(Action.NONE, "Running", True, "Running", "the domain is running")
        if state is PowerState.PAUSED:
            return plan(Action.NONE, "Paused", True, "Paused", "the domain is paused (runStrategy Manual)")
        if state is PowerState.SHUTTING_DOWN:
            return plan(Action.NONE, "Stopping", True, "Stopping", "the guest is shutting down")
        return plan(Action.NONE, "Stopped", True, "Stopped", "the domain is stopped (runStrategy Manual)")

    if want:
        if state is PowerState.RUNNING:
            return plan(Action.NONE, "Running", True, "Running", "the domain is running")
        if state is PowerState.PAUSED:
            return plan(Action.NONE, "Paused", False, "Paused", "the domain is paused")
        if state is PowerState.SHUTTING_DOWN:
            requeue.append(1.0)
            return plan(Action.NONE, "Stopping", False, "Stopping", "the guest is shutting down; it will be restarted")
        if state is PowerState.CRASHED:
            return plan(Action.DESTROY, "CrashLoopBackOff", False, "CrashLoopBackOff",
                        "the domain crashed; powering it off before a restart")
        if failure is not None and failure.retry_after is not None and failure.retry_after > now:
            wait = (failure.retry_after - now).total_seconds()
            requeue.append(wait)
            return plan(Action.NONE, "CrashLoopBackOff", False, "CrashLoopBackOff",
                        f"the domain failed {failure.consecutive_fail_count} time(s) in a row; next start at "
                        f"{timestamp(failure.retry_after)}")
        return plan(Action.START, "Starting", False, "Starting", "starting the domain")

    # want is False
    if off:
        if run_strategy == "Halted":
            message = "the domain is stopped (runStrategy Halted)"
        elif run_strategy == "Once":
            message = "the domain ran once and stopped (runStrategy Once)"
        else:
            message = "the guest shut down cleanly (runStrategy RerunOnFailure)"
        # Stopped on purpose: a crash-loop record no longer applies.
        return plan(Action.NONE, "Stopped", True, "Stopped", message,
                    dataclasses.replace(bookkept, start_failure=None))
    if state is PowerState.PAUSED or grace_seconds <= 0:
        return plan(Action.DESTROY, "Stopping", False, "Stopping", "powering the domain off",
                    dataclasses.replace(bookkept, stop_requested_time=stop_req or now))
    if stop_req is None:
        requeue.append(grace_seconds)
        return plan(Action.SHUTDOWN, "Stopping", False, "Stopping", "asking the guest to shut down",
                    dataclasses.replace(bookkept, stop_requested_time=now))
    waited = (now - stop_req).total_seconds()
    if waited >= grace_seconds:
        return plan(Action.DESTROY, "Stopping", False, "Stopping",
                    f"the guest did not shut down within {grace_seconds:.0f}s; powering it off")
    requeue.append(grace_seconds - waited)
    return plan(Action.NONE, "Stopping", False, "Stopping",
                f"waiting up to {grace_seconds:.0f}s for the guest to shut down; then it is powered off")


def eject_media_now(install_media_policy: str, first_boot_time: dt.datetime | None, media_ejected: bool,
                    observed: DomainObservation) -> bool:
    """EjectAfterFirstBoot: empty the cdroms once the first run has ended (the domain is off after
    having booted). Never while it runs: an installer still reads its media."""
    return (install_media_policy == "EjectAfterFirstBoot" and not media_ejected and first_boot_time is not None
            and observed.state in (PowerState.SHUTOFF, PowerState.CRASHED))


# --------------------------------------------------------------------------------------------
# Redefinition
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RedefinePlan:
    define: bool            # (re)define the persistent domain
    restart_required: bool  # the running domain still uses an older definition


def plan_redefine(desired_hash: str, defined_hash: str | None, live_hash: str | None,
                  active: bool) -> RedefinePlan:
    """defined_hash: from the persistent (inactive) XML, None when absent or not ours;
    live_hash: from the running XML (None when not running). libvirt applies a new persistent
    definition at the next boot, so a running domain with another definition needs a restart."""
    define = defined_hash != desired_hash
    restart = active and live_hash is not None and live_hash != desired_hash
    return RedefinePlan(define, restart)


# --------------------------------------------------------------------------------------------
# Printable status
# --------------------------------------------------------------------------------------------

def printable_status(*, deleting: bool = False, unschedulable: bool = False, waiting_for_media: bool = False,
                     provisioning: bool = False, host_unknown: bool = False,
                     power: PowerPlan | None = None) -> str:
    """One word for humans, in priority order."""
    if deleting:
        return "Terminating"
    if unschedulable:
        return "ErrorUnschedulable"
    if waiting_for_media:
        return "WaitingForMedia"
    if host_unknown:
        return "Unknown"
    if provisioning or power is None:
        return "Provisioning"
    return power.printable

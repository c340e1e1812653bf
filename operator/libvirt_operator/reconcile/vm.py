"""VirtualMachine orchestration: place, provision volumes, define the domain, drive its power state
per the plan, and tear everything down on deletion. Decisions live in reconcile.plan; this module
only gathers inputs, calls libvirt through the pool and turns the result into status + events.

The operator never writes spec: every result is a status (and Events)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pydantic

from ..adapters.libvirt import domains
from ..adapters.libvirt.volumes import volume_name as iso_volume_name
from ..adapters.libvirt.domain_xml import DomainXMLError, build_domain_xml, definition_hash
from ..core.api.common import FORCE_RELEASE_ANNOTATION
from ..core.api.host import LibvirtHostSpec
from ..core.api.vm import StartFailure, VirtualMachineSpec
from ..core.conditions import get_condition, now as utcnow, remove_condition, set_condition, summarize, timestamp
from ..core.domain import (
    ABSENT, DiskDefinition, DomainDefinition, DomainObservation, InterfaceDefinition, Owner, PowerState,
    domain_name, volume_name,
)
from ..core.errors import AppError, ErrorCode
from ..core.logs import get_logger
from ..core.metrics import VM_OPERATIONS
from ..core.quantity import parse_quantity
from . import plan
from .host import connect_options
from .failures import error_status, human_message, parse_time
from .runtime import Runtime

log = get_logger(__name__)

SCHEDULED, RESTART_REQUIRED = "Scheduled", "RestartRequired"
SCHEDULING_CODES = {ErrorCode.NO_SCHEDULABLE_HOST, ErrorCode.INSUFFICIENT_RESOURCES}
# A host refusing the VM (LibvirtHost tenancy fields): not retried on a timer, re-checked when a host
# or a namespace changes.
TENANCY_CODES = {ErrorCode.NAMESPACE_NOT_ALLOWED, ErrorCode.POOL_NOT_ALLOWED, ErrorCode.NETWORK_NOT_ALLOWED}
_NOT_GUEST_FAULT = {ErrorCode.HOST_UNREACHABLE, ErrorCode.HOST_AUTH_FAILED, ErrorCode.LIBVIRT_TIMEOUT,
                    ErrorCode.HOST_NOT_FOUND}
_OPERATION = {plan.Action.START: "start", plan.Action.SHUTDOWN: "stop", plan.Action.DESTROY: "stop"}

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


def _time(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value
    if not value:
        return None
    try:
        return parse_time(value)
    except ValueError:
        parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def _power_status(status: Mapping[str, Any]) -> plan.PowerStatus:
    failure = status.get("startFailure")
    return plan.PowerStatus(
        first_boot_time=_time(status.get("firstBootTime")),
        last_start_time=_time(status.get("lastStartTime")),
        stop_requested_time=_time(status.get("stopRequestedTime")),
        start_failure=StartFailure.model_validate(failure) if failure else None,
    )


def _put_power_status(status: dict[str, Any], power: plan.PowerStatus) -> None:
    for key, value in (("firstBootTime", power.first_boot_time), ("lastStartTime", power.last_start_time),
                       ("stopRequestedTime", power.stop_requested_time)):
        if value is None:
            status.pop(key, None)
        else:
            status[key] = timestamp(value)
    if power.start_failure is None:
        status.pop("startFailure", None)
    else:
        status["startFailure"] = power.start_failure.to_wire()


class _Stage:
    """Where a reconcile got to, so an error maps to the right printable status and conditions."""

    def __init__(self) -> None:
        self.placed = False
        self.waiting_media = False
        self.start_failed = False
        # Placed, but the host no longer admits the VM (tenancy): the domain as it is, left alone.
        self.refused: DomainObservation | None = None


async def sync_vm(body: Mapping[str, Any], rt: Runtime, view: ClusterView, *,
                  observed: DomainObservation | None = None, now: dt.datetime | None = None) -> VmOutcome:
    """Reconcile one VM. With `observed` (from a host's bulk resync) only the power state and status
    are refreshed; without it, the full path runs: placement, media, volumes, (re)definition, power."""
    now = now or utcnow()
    meta = body.get("metadata") or {}
    namespace, name, uid = meta.get("namespace", ""), meta.get("name", ""), meta.get("uid", "")
    generation = int(meta.get("generation") or 0)
    old_status = dict(body.get("status") or {})
    status = dict(old_status)
    events: list[Event] = []
    stage = _Stage()
    full = observed is None or not observed.exists
    try:
        try:
            spec = VirtualMachineSpec.model_validate(body.get("spec") or {})
        except pydantic.ValidationError as err:
            raise AppError(ErrorCode.INVALID_SPEC, f"invalid spec: {err.errors()[0].get('msg')}") from err
        if observed is not None and plan.eject_media_now(
                spec.install_media_policy, _time(status.get("firstBootTime")), bool(status.get("mediaEjected")),
                observed):
            _eject(status, events)
            full = True  # redefine without the media before the next start
        host = status.get("host")
        if not host:
            views = [plan.HostView.from_object(h) for h in view.hosts.values()]
            labels = await view.labels_if_needed(
                [v for v in views if plan.matches_selector(v, spec)], namespace)
            placement = plan.choose_host(
                spec, views, view.reservations_for(plan.capacity_hosts(spec, views), uid),
                namespace=namespace, namespace_labels=labels)
            if placement.error is not None:
                raise placement.error
            host = placement.host
            assert host is not None
            # Visible to the next placement now, not once the status patch lands after define+start.
            view.placed(uid, plan.placement_reservation(spec, host, uid))
            status["host"] = host
            events.append(("Normal", "Scheduled", f"placed on LibvirtHost {host}"))
        stage.placed = True
        conditions = set_condition(status.get("conditions") or [], SCHEDULED, True, "Scheduled",
                                   f"placed on LibvirtHost {host}", generation)
        status["conditions"] = conditions
        assert host is not None
        host_obj = view.hosts.get(host)
        if host_obj is None:
            raise AppError(ErrorCode.HOST_NOT_FOUND, f"LibvirtHost {host} the VM is placed on does not exist",
                           {"host": host})
        conn = await host_connection(rt, host, host_obj)
        if conn is None:
            raise AppError(ErrorCode.HOST_UNREACHABLE, f"the operator has no connection to LibvirtHost {host} yet",
                           {"host": host})
        hv = plan.HostView.from_object(host_obj)
        refusal = plan.host_denial(spec, hv, namespace, await view.labels_if_needed([hv], namespace))
        if refusal is not None:
            # Placed earlier, refused now (the host's tenancy fields or the namespace's labels changed,
            # or the spec asks for a pool/network the host does not expose): never define, redefine or
            # start; never stop or delete a domain that exists either (that is the user's or the
            # admin's call). Report the domain's power state as it is.
            if observed is None:
                details = await conn.call("get_domain", lambda c: domains.get_domain(c, uid))
                observed = details.observation if details else ABSENT
            stage.refused = observed
            raise _refused(refusal, observed)
        dname = domain_name(namespace, name, uid)
        if observed is not None and observed.exists and observed.name:
            dname = observed.name  # the VM's own domain (found by UUID) keeps the name it was created with
        status.update({"domainName": dname, "domainUUID": uid, "runStrategy": spec.run_strategy})

        redefine = plan.RedefinePlan(False, False)
        macs: dict[str, str] | None = None
        if full:
            dtype = plan.domain_type_for(spec.domain_type, hv.domain_types, status.get("domainType"))
            status["domainType"] = dtype
            details = await conn.call("get_domain", lambda c: domains.get_domain(c, uid))
            if details is not None and details.observation.name and details.observation.name != dname:
                dname = details.observation.name  # created under an earlier naming scheme: keep it
                status["domainName"] = dname
            if details is None:  # before any volume is made: a name taken by another domain stops here
                taken = await conn.call("find_by_name", lambda c: domains.find_by_name(c, dname))
                if taken is not None and taken[0] != uid:
                    raise _name_conflict(dname, host, taken[0], taken[1].owner, view)
            if details is not None and not status.get("mediaEjected") and plan.eject_media_now(
                    spec.install_media_policy, _time(status.get("firstBootTime")), False, details.observation):
                _eject(status, events)
            disks = await _resolve_media(spec, namespace, host, hv, conn, view, stage,
                                         ejected=bool(status.get("mediaEjected")))
            volumes, disks = await _ensure_volumes(spec, uid, hv, conn, disks, events)
            status["volumes"] = volumes
            defn = DomainDefinition(
                name=dname, uuid=uid, vcpus=spec.cpu, memory_bytes=parse_quantity(spec.memory), type=dtype,
                firmware=spec.firmware, owner=Owner(namespace, name, uid), disks=tuple(disks),
                interfaces=tuple(InterfaceDefinition(i.name, i.type, i.source, i.model, i.mac_address)
                                 for i in spec.interfaces))
            try:
                xml, desired = build_domain_xml(defn), definition_hash(defn)
            except DomainXMLError as err:
                raise AppError(ErrorCode.INVALID_SPEC, str(err)) from err
            observed = details.observation if details else ABSENT
            redefine = plan.plan_redefine(desired, details.defined.definition_hash if details else None,
                                          details.live.definition_hash if details and details.live else None,
                                          observed.active)
            if redefine.define:
                await conn.call("define", lambda c: domains.define(c, xml))
                VM_OPERATIONS.labels("create" if details is None else "redefine").inc()
                events.append(("Normal", "Defined" if details is None else "Redefined",
                               f"domain {dname} {'defined' if details is None else 'redefined'} on {host}"))
                details = await conn.call("get_domain", lambda c: domains.get_domain(c, uid))  # MACs libvirt chose
                observed = details.observation if details else DomainObservation(PowerState.SHUTOFF, name=dname, uuid=uid)
            macs = details.macs if details else {}
        assert observed is not None

        booted_fresh = not observed.active  # a (re)start uses the current persistent definition
        power = _power_status(status)
        grace = float(spec.termination_grace_period_seconds)
        pp = plan.plan_power(spec.run_strategy, observed, power, now, grace)
        requeue = pp.requeue_after
        start_error: AppError | None = None
        if pp.action is not plan.Action.NONE:
            after = pp.status
            try:
                observed = await _act(pp.action, conn, uid)
                VM_OPERATIONS.labels(_OPERATION[pp.action]).inc()
                if pp.action is plan.Action.START:
                    after = dataclasses.replace(after, last_start_time=now, first_boot_time=after.first_boot_time or now)
                    events.append(("Normal", "Started", f"domain {dname} started on {host}"))
                elif pp.action is plan.Action.SHUTDOWN:
                    events.append(("Normal", "ShuttingDown", f"asked the guest of {dname} to shut down"))
                else:
                    events.append(("Normal", "Stopped", f"domain {dname} powered off"))
            except AppError as err:
                if pp.action is not plan.Action.START or err.code in _NOT_GUEST_FAULT:
                    raise
                # A failed start counts like a crash: back off before the next attempt.
                failure = plan.record_start_failure(after.start_failure, now, None)
                after = dataclasses.replace(after, start_failure=failure)
                start_error = err
                stage.start_failed = True
                events.append(("Warning", "FailedStart", human_message(err)))
            pp2 = plan.plan_power(spec.run_strategy, observed, after, now, grace)
            if pp2.action is not plan.Action.NONE:
                requeue = 0.5 if pp2.action is not pp.action else requeue
            pp = pp2
            if pp2.requeue_after is not None:
                requeue = min(requeue, pp2.requeue_after) if requeue is not None else pp2.requeue_after
        _put_power_status(status, pp.status)

        if start_error is not None:
            raise start_error

        status["printableStatus"] = plan.printable_status(power=pp)
        conditions = status["conditions"]
        if full:
            if redefine.restart_required:
                conditions = set_condition(conditions, RESTART_REQUIRED, True, "DefinitionChanged",
                                           "the spec changed while the domain runs; it applies at the next boot",
                                           generation)
                if get_condition(old_status.get("conditions"), RESTART_REQUIRED) is None or \
                        (get_condition(old_status.get("conditions"), RESTART_REQUIRED) or {}).get("status") != "True":
                    events.append(("Normal", "RestartRequired", "the spec changed; restart the VM to apply it"))
            else:
                conditions = remove_condition(conditions, RESTART_REQUIRED)
        elif booted_fresh or not observed.active:
            conditions = remove_condition(conditions, RESTART_REQUIRED)  # the next boot uses the new definition
        backing_off = pp.status.start_failure is not None and not observed.active
        message = pp.message
        if backing_off and status.get("error"):
            # Keep the failure that caused the backoff visible until a start succeeds.
            message = f"{message}; last failure: [{status['error']['code']}] {status['error']['message']}"
        else:
            status.pop("error", None)
        conditions = summarize(conditions, ready=pp.ready, reason=pp.reason, message=message,
                               generation=generation, reconciling=not pp.ready and pp.reason != "Paused")
        status["conditions"] = conditions
        if full:
            status["observedGeneration"] = generation
        if macs is not None:
            status["interfaces"] = [{"name": i.name, **({"mac": macs[i.name]} if i.name in macs else {})}
                                    for i in spec.interfaces]
        if observed.state is PowerState.RUNNING and not status.get("firstBootTime"):
            status["firstBootTime"] = timestamp(now)
        _transition_events(old_status, status, events)
        return VmOutcome(status, events, None, requeue)
    except AppError as err:
        return await _failed(err, old_status, status, generation, stage, rt, events)


async def host_connection(rt: Runtime, name: str, host_obj: Mapping[str, Any] | None) -> Any:
    """The pooled connection to a host; opened here (same options as the host probe would use) when
    the probe has not run yet, e.g. right after an operator restart."""
    conn = rt.pool.get(name)
    if conn is not None or host_obj is None:
        return conn
    spec = LibvirtHostSpec.model_validate(host_obj.get("spec") or {})
    return await rt.pool.ensure(name, await connect_options(spec, rt))


def _refused(err: AppError, observed: DomainObservation) -> AppError:
    if observed.active:
        left = ("the running domain is left running (the operator never stops a VM for this); it will not be "
                "restarted or redefined until the host admits it again")
    elif observed.exists:
        left = "the domain stays stopped: it is not started or redefined until the host admits it again"
    else:
        left = "no domain is created until the host admits it again"
    return AppError(err.code, f"{err.message}; {left}", err.context)


def _refused_printable(observed: DomainObservation) -> str:
    if observed.state is PowerState.RUNNING:
        return "Running"
    if observed.state is PowerState.PAUSED:
        return "Paused"
    if observed.state is PowerState.SHUTTING_DOWN:
        return "Stopping"
    return "Stopped" if observed.exists else "ErrorUnschedulable"


def _eject(status: dict[str, Any], events: list[Event]) -> None:
    status["mediaEjected"] = True
    events.append(("Normal", "MediaEjected", "the first run ended: install media removed from the cdroms"))


async def _act(action: plan.Action, conn: Any, uid: str) -> DomainObservation:
    if action is plan.Action.START:
        return await conn.call("start", lambda c: domains.start(c, uid))
    if action is plan.Action.SHUTDOWN:
        return await conn.call("shutdown", lambda c: domains.shutdown(c, uid))
    return await conn.call("destroy", lambda c: domains.destroy(c, uid))


def _name_conflict(dname: str, host: str, uuid: str, owner: Owner | None, view: ClusterView) -> AppError:
    """A domain with our name but another UUID: never adopted, redefined or deleted; say whose it is."""
    if owner is None:
        whose = "not managed by this operator"
    else:
        live = any((vm.get("metadata") or {}).get("uid") == owner.uid for vm in view.vms())
        whose = (f"it belongs to VirtualMachine {owner.namespace}/{owner.name} (uid {owner.uid})"
                 + ("" if live else ", which this operator does not see (deleted, or in a namespace it does "
                    "not watch)"))
    return AppError(ErrorCode.LIBVIRT_ERROR,
                    f"a domain named {dname} with UUID {uuid} already exists on {host}, {whose}; it is left "
                    "untouched. Remove or rename it on the host (virsh undefine) and the VM will be created",
                    {"host": host, "domain": dname, "uuid": uuid})


def _iso_volume(iso: Mapping[str, Any], namespace: str, ref: str, hv: plan.HostView) -> tuple[str, str] | None:
    """(pool, volume) the importer gives this ISOImage on this host, derived from the ISOImage's own
    identity (namespace, name, checksum) and the pool rule, never from the pool/volume in its status:
    whoever can write that status cannot point a cdrom at another image's or tenant's volume."""
    iso_spec = iso.get("spec") or {}
    checksum = iso_spec.get("checksum") or (iso.get("status") or {}).get("verifiedChecksum")
    if not checksum:
        return None
    try:
        volume = iso_volume_name(namespace, ref, str(checksum))
    except ValueError:
        return None
    return iso_spec.get("pool") or hv.default_pool, volume


async def _resolve_media(spec: VirtualMachineSpec, namespace: str, host: str, hv: plan.HostView, conn: Any,
                         view: ClusterView, stage: _Stage, ejected: bool = False) -> list[DiskDefinition]:
    """Disk definitions; cdroms point at the ISOImage volume's path on this host (empty once ejected).
    The volume's name is derived from the ISOImage and checked to exist on the host."""
    disks: list[DiskDefinition] = []
    for disk in spec.disks:
        if disk.cdrom is None:
            disks.append(DiskDefinition(disk.name, "disk", None, "qcow2", disk.boot_order))
            continue
        if ejected:
            disks.append(DiskDefinition(disk.name, "cdrom", None, "raw", disk.boot_order))
            continue
        ref = disk.cdrom.iso_image_ref.name
        iso = view.iso(namespace, ref)
        entry = expected = None
        if iso is not None:
            # The import's progress as reported; what is attached is decided below, from the host.
            entry = next((h for h in (iso.get("status") or {}).get("hosts") or []
                          if h.get("host") == host and h.get("phase") == "Ready"), None)
            expected = _iso_volume(iso, namespace, ref, hv)
        if entry is None or expected is None:
            stage.waiting_media = True
            why = "does not exist" if iso is None else f"is not Ready on LibvirtHost {host}"
            raise AppError(ErrorCode.ISO_NOT_FOUND, f"ISOImage {namespace}/{ref} for disk {disk.name} {why}",
                           {"isoImage": ref, "host": host, "disk": disk.name})
        pool, vol = expected
        path = await conn.call("volume_path", lambda c, p=pool, v=vol: domains.volume_path(c, p, v))
        if path is None:
            stage.waiting_media = True
            raise AppError(ErrorCode.ISO_NOT_FOUND,
                           f"volume {vol} of ISOImage {namespace}/{ref} is missing from pool {pool} on {host}",
                           {"isoImage": ref, "host": host, "pool": pool, "volume": vol})
        disks.append(DiskDefinition(disk.name, "cdrom", path, "raw", disk.boot_order, pool, vol))
    return disks


async def _ensure_volumes(spec: VirtualMachineSpec, uid: str, hv: plan.HostView, conn: Any,
                          disks: list[DiskDefinition], events: list[Event]
                          ) -> tuple[list[dict[str, str]], list[DiskDefinition]]:
    """Each volume disk gets the volume named with the VM's uid (created when missing), or the
    earlier-scheme volume its own domain already uses. The returned list is the informational
    status.volumes: nothing ever reads it back to decide what to attach or delete."""
    requests = []
    for disk in spec.disks:
        if disk.volume is not None:
            requests.append(domains.VolumeRequest(disk.volume.pool or hv.default_pool, volume_name(uid, disk.name),
                                                  parse_quantity(disk.volume.size), disk.name))
    if not requests:
        return [], disks
    results = await conn.call("ensure_volumes", lambda c: domains.ensure_volumes(c, uid, requests))
    by_disk = {r.disk: r for r in results}
    out = []
    for d in disks:
        if d.device == "disk":
            r = by_disk[d.name]
            out.append(dataclasses.replace(d, path=r.path, pool=r.pool, volume=r.name))
        else:
            out.append(d)
    created = [r.name for r in results if r.created]
    if created:
        VM_OPERATIONS.labels("create_volume").inc(len(created))
        events.append(("Normal", "VolumesCreated", f"created volume(s) {', '.join(created)}"))
    volumes = [{"disk": d.name, "pool": d.pool or "", "name": d.volume or ""} for d in out if d.device == "disk"]
    return volumes, out


def _transition_events(old: Mapping[str, Any], new: Mapping[str, Any], events: list[Event]) -> None:
    before, after = old.get("printableStatus"), new.get("printableStatus")
    if before == after:
        return
    if after == "CrashLoopBackOff":
        events.append(("Warning", "CrashLoopBackOff",
                       (get_condition(new.get("conditions"), "Ready") or {}).get("message", "")))
    elif after in ("Running", "Stopped") and not any(e[1] in ("Started", "Stopped") for e in events):
        events.append(("Normal", after, f"the domain is {after.lower()}"))


async def _failed(err: AppError, old_status: Mapping[str, Any], status: dict[str, Any], generation: int,
                  stage: _Stage, rt: Runtime, events: list[Event]) -> VmOutcome:
    err_status = await error_status(err, old_status.get("error"), "VirtualMachine", rt.remediator)
    message = human_message(err, err_status)
    conditions = list(status.get("conditions") or [])
    scheduling = not stage.placed
    if scheduling:
        conditions = set_condition(conditions, SCHEDULED, False, err.reason, message, generation)
    conditions = summarize(conditions, ready=False, reason=err.reason, message=message, generation=generation,
                           reconciling=err.retryable, stalled=not err.retryable)
    status["conditions"] = conditions
    status["error"] = err_status
    status["observedGeneration"] = generation
    requeue = None
    if stage.refused is not None:
        status["printableStatus"] = _refused_printable(stage.refused)
    elif stage.start_failed:
        status["printableStatus"] = "CrashLoopBackOff"
        retry_after = _time((status.get("startFailure") or {}).get("retryAfter"))
        if retry_after is not None:
            requeue = max(0.5, (retry_after - utcnow()).total_seconds())
    else:
        status["printableStatus"] = plan.printable_status(
            unschedulable=scheduling, waiting_for_media=stage.waiting_media,
            host_unknown=err.code in (ErrorCode.HOST_UNREACHABLE, ErrorCode.HOST_NOT_FOUND, ErrorCode.LIBVIRT_TIMEOUT),
            provisioning=True)
    previous_code = (old_status.get("error") or {}).get("code")
    if previous_code != err.code.value and not stage.start_failed:
        events.append(("Warning", err.reason, message))
    return VmOutcome(status, events, err, requeue)


# --------------------------------------------------------------------------------------------
# Deletion
# --------------------------------------------------------------------------------------------

async def delete_vm(body: Mapping[str, Any], rt: Runtime, view: ClusterView) -> DeleteOutcome:
    """Destroy, undefine (NVRAM too) and delete the VM's volumes: those named with its uid and those
    its own domain (UUID = uid) uses under the earlier naming scheme; decided on the host, never from
    status.volumes or status.domainName (whoever can patch status must not choose what is deleted).
    A host that is gone or unreachable blocks release with a condition until it returns, or until the
    VM carries the annotation virt.libvirt-operator.io/force-release: "true" (then the finalizer is
    released and whatever is left on the host is abandoned)."""
    meta = body.get("metadata") or {}
    uid = meta.get("uid", "")
    generation = int(meta.get("generation") or 0)
    status = dict(body.get("status") or {})
    force = (meta.get("annotations") or {}).get(FORCE_RELEASE_ANNOTATION) == "true"
    host = status.get("host")
    if not host:
        return DeleteOutcome(True, None, [])
    host_obj = view.hosts.get(host)
    default_pool = plan.HostView.from_object(host_obj).default_pool if host_obj else "default"
    # Where to look for volumes named with the VM's uid (the adapter adds its domain's disks' pools).
    # Pools from status only widen the search: a name without this uid is never deleted.
    pools = {default_pool}
    pools.update(str(v["pool"]) for v in status.get("volumes") or [] if isinstance(v, dict) and v.get("pool"))
    try:
        spec = VirtualMachineSpec.model_validate(body.get("spec") or {})
        pools.update(disk.volume.pool or default_pool for disk in spec.disks if disk.volume is not None)
    except pydantic.ValidationError:
        pass
    try:
        conn = await host_connection(rt, host, host_obj)
        if conn is None:
            raise AppError(ErrorCode.HOST_NOT_FOUND,
                           f"LibvirtHost {host} is gone: the domain and its volumes cannot be removed; set the "
                           f'annotation {FORCE_RELEASE_ANNOTATION}: "true" to release the VM anyway',
                           {"host": host})
        if not uid:
            raise AppError(ErrorCode.INVALID_SPEC, "the VirtualMachine has no uid", {"host": host})
        deleted = await conn.call("teardown", lambda c: domains.teardown(c, uid, sorted(pools)))
    except AppError as err:
        if force:
            return DeleteOutcome(True, None, [("Warning", "ForceReleased",
                                               f"released without cleaning up host {host}: {err.message}")], None)
        err_status = await error_status(err, status.get("error"), "VirtualMachine", rt.remediator)
        message = human_message(err, err_status)
        conditions = summarize(status.get("conditions") or [], ready=False, reason=err.reason, message=message,
                               generation=generation, reconciling=True, stalled=err.code is ErrorCode.HOST_NOT_FOUND)
        conditions = set_condition(conditions, "DeletionBlocked", True, err.reason, message, generation)
        new = {**status, "conditions": conditions, "error": err_status, "printableStatus": "Terminating"}
        events = [] if (status.get("error") or {}).get("code") == err.code.value else [
            ("Warning", "DeletionBlocked", message)]
        return DeleteOutcome(False, new, events, err)
    VM_OPERATIONS.labels("delete").inc()
    return DeleteOutcome(True, None, [("Normal", "Deleted",
                                       f"domain removed from {host}; volumes deleted: {', '.join(deleted) or 'none'}")])


def host_lost_status(body: Mapping[str, Any], err: AppError, error_state: dict[str, Any]) -> dict[str, Any]:
    """Status of a VM whose host cannot be asked (resync failed): power state Unknown, Ready=False.
    The placement and run bookkeeping stay as they were."""
    meta = body.get("metadata") or {}
    generation = int(meta.get("generation") or 0)
    status = dict(body.get("status") or {})
    message = human_message(err, error_state)
    status["conditions"] = summarize(status.get("conditions") or [], ready=False, reason=err.reason,
                                     message=message, generation=generation, reconciling=True)
    status["printableStatus"] = "Unknown"
    status["error"] = error_state
    return status

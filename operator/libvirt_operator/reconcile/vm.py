"""VirtualMachine orchestration: place, provision volumes, define the domain, drive its power state
per the plan, and tear everything down on deletion. Decisions live in reconcile.plan; this module
only gathers inputs, calls libvirt through the pool and turns the result into status + events.

The operator never writes spec: every result is a status (and Events)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pydantic

from ..adapters.libvirt import domains
from ..adapters.libvirt.domain_xml import DomainXMLError, build_domain_xml, definition_hash
from ..core.api.common import FORCE_RELEASE_ANNOTATION
from ..core.api.vm import StartFailure, VirtualMachineSpec
from ..core.conditions import get_condition, now as utcnow, remove_condition, set_condition, summarize, timestamp
from ..core.domain import (
    ABSENT, DomainDefinition, DomainObservation, InterfaceDefinition, Owner, PowerState, StopCause, domain_name,
)
from ..core.errors import AppError, ErrorCode
from ..core.logs import get_logger
from ..core.metrics import VM_OPERATIONS
from ..core.quantity import parse_quantity
from ..core.timestamps import parse_time as _time
from . import actions, addresses, plan, vm_actions, vm_seed
from .host import host_connection
from .failures import error_status, human_message
from .runtime import Runtime
from .vm_types import ClusterView, DeleteOutcome, Event, VmOutcome, _Stage
from .vm_status import RESTART_REQUIRED, SCHEDULED, _failed, _refused, _transition_events
from .vm_placement import find_own_domain
from .vm_media import _eject, _resolve_media
from .vm_volumes import _check_commitment, _ensure_volumes, _existing_volumes

log = get_logger(__name__)

_NOT_GUEST_FAULT = {ErrorCode.HOST_UNREACHABLE, ErrorCode.HOST_AUTH_FAILED, ErrorCode.LIBVIRT_TIMEOUT,
                    ErrorCode.HOST_NOT_FOUND}
_OPERATION = {plan.Action.START: "start", plan.Action.SHUTDOWN: "stop", plan.Action.DESTROY: "stop"}


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
            # A domain with this UUID already on a host this VM could be on (an earlier placement whose
            # status write was lost, or a status wiped since): that host, never a second domain.
            host = await find_own_domain(rt, uid, [v.name for v in views if plan.matches_selector(v, spec)],
                                         view)
            if host is not None:
                events.append(("Normal", "Adopted", f"found its domain (UUID {uid}) on LibvirtHost {host}"))
            else:
                labels = await view.labels_if_needed(
                    [v for v in views if plan.matches_selector(v, spec)], namespace)
                placement = plan.choose_host(
                    spec, views, view.reservations_for(plan.capacity_hosts(spec, views), uid),
                    namespace=namespace, namespace_labels=labels)
                if placement.error is not None:
                    raise placement.error
                host = placement.host
                assert host is not None
                events.append(("Normal", "Scheduled", f"placed on LibvirtHost {host}"))
            # Visible to the next placement now, not once the status shows it.
            view.placed(uid, plan.placement_reservation(spec, host, uid))
            status["host"] = host
            status["conditions"] = set_condition(status.get("conditions") or [], SCHEDULED, True, "Scheduled",
                                                 f"placed on LibvirtHost {host}", generation)
            if view.record_placement is not None:
                # Recorded BEFORE anything is created on the host: a placement that is not in the
                # status never has a domain, so a retry can never start the VM on a second host.
                try:
                    recorded = await view.record_placement(
                        body, {"host": host, "conditions": status["conditions"]})
                except AppError:
                    view.placed(uid, None)
                    status.pop("host", None)
                    raise
                if recorded != host:  # another writer placed it first: theirs holds
                    host = recorded
                    view.placed(uid, plan.placement_reservation(spec, host, uid))
                    status["host"] = host
        stage.placed = True
        conditions = set_condition(status.get("conditions") or [], SCHEDULED, True, "Scheduled",
                                   f"placed on LibvirtHost {host}", generation)
        status["conditions"] = conditions
        assert host is not None
        host_obj = view.hosts.get(host)
        if host_obj is None and rt.kube is not None:
            host_obj = await rt.kube.get_object("libvirthosts", host)  # the cache may not have it yet
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
            try:
                volumes, disks, created_in = await _ensure_volumes(spec, uid, hv, conn, disks, events)
            except AppError:
                # Some may exist by now (the first disk's, when the second one's pool fails): say so.
                status["volumes"] = await _existing_volumes(spec, uid, hv, conn)
                raise
            status["volumes"] = volumes
            seed = await vm_seed.attach_seed(spec, namespace, name, uid, hv, conn, rt)  # spec.cloudInit
            if seed is not None:
                disks = [*disks, seed.disk]
                status["volumes"] = [*volumes, seed.volume]
                if seed.uploaded:
                    events.append(("Normal", "CloudInitSeedCreated", f"cloud-init seed {seed.volume['name']} "
                                                                     f"uploaded to pool {seed.volume['pool']}"))
            if created_in:
                await _check_commitment(host, sorted(created_in), conn, status, events, generation)
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
        # A start/stop/restart/pause/unpause request (annotation), executed once; in the full path only
        # (handlers, requeue loop), never in a host's bulk round.
        request = actions.pending_request(meta.get("annotations"), status.get("lastAction")) if full else None
        if request is not None:
            acted = await vm_actions.execute(
                request, spec.run_strategy, float(spec.termination_grace_period_seconds), observed, conn, uid,
                status, events, now, _pending_writer(rt, namespace, name))
            observed = acted.observed
            booted_fresh = booted_fresh or acted.booted
        crashed = spec.run_strategy != "Halted" and _crashed(observed)  # as found, before any action
        power = _power_status(status)
        grace = float(spec.termination_grace_period_seconds)
        strategy = spec.run_strategy
        if actions.held_stopped(strategy, status.get("lastAction"), observed.state):
            strategy = "Halted"  # stopped on request: not a failure to rerun (until a start request)
        pp = plan.plan_power(strategy, observed, power, now, grace)
        if strategy != spec.run_strategy and pp.action is plan.Action.NONE:
            pp = dataclasses.replace(pp, message="the domain was stopped by a stop request; it stays stopped until "
                                                 "a start request (runStrategy RerunOnFailure)")
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
            pp2 = plan.plan_power(strategy, observed, after, now, grace)
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
            if redefine.restart_required and not booted_fresh:
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
        ready, reason, stalled = pp.ready, pp.reason, False
        if crashed and (old_status.get("error") or {}).get("code") != ErrorCode.DOMAIN_CRASHED.value:
            # A Warning Event in any case; status.error while it is down (a restart clears it).
            crash = AppError(ErrorCode.DOMAIN_CRASHED,
                             f"the domain {dname} on {host} stopped unexpectedly (QEMU crashed, failed or was killed)",
                             {"host": host, "domain": dname})
            crash_state = await error_status(crash, old_status.get("error"), "VirtualMachine", rt.remediator)
            events.append(("Warning", crash.reason, human_message(crash, crash_state)))
            if not observed.active:
                status["error"] = crash_state
        if crashed and not observed.active and pp.desired_running is not True:
            # Nothing restarts it (Manual, Once): not a clean stop, and nothing to wait for.
            ready, reason, stalled = False, "DomainCrashed", True
            message = f"{message}; it crashed: [{status['error']['code']}] {status['error']['message']}"
        elif backing_off and status.get("error"):
            # Keep the failure that caused the backoff visible until a start succeeds.
            message = f"{message}; last failure: [{status['error']['code']}] {status['error']['message']}"
        else:
            status.pop("error", None)
        if backing_off and plan.crash_looping_stalled(pp.status.start_failure):
            stalled = True  # still retried after each backoff; reported as failed meanwhile
        conditions = summarize(conditions, ready=ready, reason=reason, message=message, generation=generation,
                               reconciling=not ready and pp.reason != "Paused" and not stalled, stalled=stalled)
        status["conditions"] = conditions
        if full:
            status["observedGeneration"] = generation
        if macs is not None:
            addresses.put(status, addresses.interfaces_status(spec.interfaces, macs, status.get("interfaces"),
                                                              running=observed.active))
        elif not observed.active:
            addresses.without_addresses(status)
        if observed.state is PowerState.RUNNING and not status.get("firstBootTime"):
            status["firstBootTime"] = timestamp(now)
        _transition_events(old_status, status, events)
        return VmOutcome(status, events, None, requeue)
    except AppError as err:
        return await _failed(err, old_status, status, generation, stage, rt, events)


def _pending_writer(rt: Runtime, namespace: str, name: str) -> Callable[[dict[str, Any]], Awaitable[None]] | None:
    """Writes status.lastAction Pending ahead of a long action (None outside the operator)."""
    if rt.kube is None:
        return None

    async def write(patch: dict[str, Any]) -> None:
        await rt.kube.patch_status("virtualmachines", namespace, name, patch)
    return write


def _crashed(observed: DomainObservation) -> bool:
    """libvirt says the domain died, not that it was shut down or powered off: state crashed, or shut
    off with reason crashed/failed (QEMU killed, crashed, or failed to start)."""
    return observed.state is PowerState.CRASHED or (
        observed.state is PowerState.SHUTOFF and observed.stop_cause is StopCause.FAILURE)


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
        return await _delete_unplaced(body, rt, view, status, generation, force)
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
        return await _deletion_blocked(err, status, generation, rt, [])
    VM_OPERATIONS.labels("delete").inc()
    return DeleteOutcome(True, None, [("Normal", "Deleted",
                                       f"domain removed from {host}; volumes deleted: {', '.join(deleted) or 'none'}")])


def _teardown_pools(body: Mapping[str, Any], default_pool: str) -> list[str]:
    pools = {default_pool}
    try:
        spec = VirtualMachineSpec.model_validate(body.get("spec") or {})
        pools.update(disk.volume.pool or default_pool for disk in spec.disks if disk.volume is not None)
    except pydantic.ValidationError:
        pass
    return sorted(pools)


async def _delete_unplaced(body: Mapping[str, Any], rt: Runtime, view: ClusterView, status: dict[str, Any],
                           generation: int, force: bool) -> DeleteOutcome:
    """A VM whose status names no host may still have a domain and volumes somewhere (placed by an
    older release that recorded the host after define, or a status wiped since): tear down by UUID
    and uid on every known host that can be asked. A Ready host the VM could be on (hostRef /
    hostSelector) that fails the teardown blocks the release, as for a placed VM; hosts that are not
    Ready are not searched (an unschedulable VM must stay deletable while its hosts are down), and
    a Warning Event names the ones the VM could be on."""
    meta = body.get("metadata") or {}
    uid = meta.get("uid", "")
    if not uid or not view.hosts:
        return DeleteOutcome(True, None, [])
    try:
        spec: VirtualMachineSpec | None = VirtualMachineSpec.model_validate(body.get("spec") or {})
    except pydantic.ValidationError:
        spec = None

    async def clean(name: str, host_obj: Mapping[str, Any]) -> tuple[str, bool, list[str] | None, AppError | None]:
        hv = plan.HostView.from_object(host_obj)
        could_be_there = spec is None or plan.matches_selector(hv, spec)
        conn = rt.pool.get(name)
        if conn is None and not hv.ready:
            return name, could_be_there, None, None
        pools = _teardown_pools(body, hv.default_pool)
        try:
            if conn is None:
                conn = await host_connection(rt, name, host_obj)
            return name, could_be_there, await conn.call("teardown", lambda c: domains.teardown(c, uid, pools)), None
        except AppError as err:
            if not (could_be_there and hv.ready):
                log.info("host not searched for an unplaced VM's leftovers", host=name, uid=uid,
                         code=err.code.value)
                return name, could_be_there, None, None
            return name, True, None, err

    results = await asyncio.gather(*(clean(n, h) for n, h in sorted(view.hosts.items())))
    blocked = [(n, e) for n, _, _, e in results if e is not None]
    cleaned = {n: d for n, _, d, _ in results if d}
    unsearched = sorted(n for n, could, d, e in results if could and d is None and e is None)
    events: list[Event] = []
    if cleaned:
        VM_OPERATIONS.labels("delete").inc()
        events.append(("Normal", "Deleted", "; ".join(f"removed from {n}: volumes {', '.join(d)}"
                                                      for n, d in sorted(cleaned.items()))))
    if not blocked:
        if unsearched:
            events.append(("Warning", "NotSearched",
                           f"the VM was never recorded on a host; LibvirtHost(s) it could be on were not Ready and "
                           f"not searched for a domain or volumes of UUID {uid}: {', '.join(unsearched[:10])}"))
        return DeleteOutcome(True, None, events)
    name, err = blocked[0]
    if force:
        return DeleteOutcome(True, None, events + [("Warning", "ForceReleased",
                                                    f"released without searching host {name}: {err.message}")])
    err = AppError(err.code, f"the VM was never recorded on a host, so every host it could be on is searched "
                             f"for its domain and volumes; {err.message}. Set the annotation "
                             f'{FORCE_RELEASE_ANNOTATION}: "true" to release it anyway', err.context)
    return await _deletion_blocked(err, status, generation, rt, events)


async def _deletion_blocked(err: AppError, status: dict[str, Any], generation: int, rt: Runtime,
                            events: list[Event]) -> DeleteOutcome:
    """The VM stays (Terminating, DeletionBlocked) until the requeue loop's next attempt succeeds."""
    err_status = await error_status(err, status.get("error"), "VirtualMachine", rt.remediator)
    message = human_message(err, err_status)
    conditions = summarize(status.get("conditions") or [], ready=False, reason=err.reason, message=message,
                           generation=generation, reconciling=True, stalled=err.code is ErrorCode.HOST_NOT_FOUND)
    conditions = set_condition(conditions, "DeletionBlocked", True, err.reason, message, generation)
    new = {**status, "conditions": conditions, "error": err_status, "printableStatus": "Terminating"}
    if (status.get("error") or {}).get("code") != err.code.value:
        events = events + [("Warning", "DeletionBlocked", message)]
    return DeleteOutcome(False, new, events, err)

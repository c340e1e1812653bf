"""VirtualMachine orchestration: place, provision volumes, define the domain, drive its power state
per the plan (deletion: reconcile.vm_delete). Decisions live in reconcile.plan; this module only
gathers inputs, calls libvirt through the pool and turns the result into status + events. Its
steps live beside it: vm_placement, vm_media, vm_volumes, vm_seed, vm_actions, vm_power, vm_status.

The operator never writes spec: every result is a status (and Events)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pydantic

from ..adapters.libvirt import domains
from ..adapters.libvirt.domain_xml import DomainXMLError, build_domain_xml, definition_hash
from ..core.api.vm import VirtualMachineSpec
from ..core.conditions import get_condition, now as utcnow, remove_condition, set_condition, summarize, timestamp
from ..core.domain import (
    ABSENT, DomainDefinition, DomainObservation, InterfaceDefinition, Owner, PowerState, domain_name,
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
from .vm_types import ClusterView, Event, VmOutcome, Stage
from .vm_status import (
    RESTART_REQUIRED, SCHEDULED, failed_outcome, name_conflict, refused_error, started_event, transition_events,
)
from .vm_placement import place
from .vm_failover import departure, staying_refusal
from .vm_migration import TARGET as MIGRATION_TARGET, settle as settle_migration
from .vm_media import eject_media, resolve_media
from .vm_volumes import check_commitment, ensure_disk_volumes, existing_volumes, recorded_volumes
from .vm_power import (
    NOT_GUEST_FAULT, OPERATION_METRIC, act, is_crashed, read_power_status, starts_when_defined, write_power_status,
)

log = get_logger(__name__)


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
    stage = Stage()
    full = observed is None or not observed.exists
    try:
        try:
            spec = VirtualMachineSpec.model_validate(body.get("spec") or {})
        except pydantic.ValidationError as err:
            raise AppError(ErrorCode.INVALID_SPEC, f"invalid spec: {err.errors()[0].get('msg')}") from err
        if observed is not None and plan.eject_media_now(
                spec.install_media_policy, _time(status.get("firstBootTime")), bool(status.get("mediaEjected")),
                observed):
            eject_media(status, events)
            full = True  # redefine without the media before the next start
        if status.get(MIGRATION_TARGET):  # a migration was interrupted: the domain's host first
            await settle_migration(rt, uid, status, view)
        host = status.get("host")
        leaving = None
        if host:
            stage.placed = True  # a VM that stays on its out-of-service host, or cannot leave it yet: still Scheduled
            leaving = departure(spec, status, view)
            if leaving is not None:
                host = await place(spec, meta, generation, body, status, view, rt, events, leaving, stage)
        if not host:
            host = await place(spec, meta, generation, body, status, view, rt, events, None, stage)
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
        refusal = plan.host_denial(spec, hv, namespace, await view.labels_if_needed([hv], namespace)) \
            or staying_refusal(spec, hv)
        if refusal is not None:
            # Placed earlier, refused now (the host's tenancy fields or the namespace's labels changed,
            # or the spec asks for a pool/network the host does not expose): never define, redefine or
            # start; never stop or delete a domain that exists either (that is the user's or the
            # admin's call). Report the domain's power state as it is.
            if observed is None:
                details = await conn.call("get_domain", lambda c: domains.get_domain(c, uid))
                observed = details.observation if details else ABSENT
            stage.refused = observed
            raise refused_error(refusal, observed)
        dname = domain_name(namespace, name, uid)
        if observed is not None and observed.exists and observed.name:
            dname = observed.name  # the VM's own domain (found by UUID) keeps the name it was created with
        status.update({"domainName": dname, "domainUUID": uid, "runStrategy": spec.run_strategy})

        # A start/stop/restart/pause/unpause request (annotation), executed once; in the full path only
        # (handlers, requeue loop), never in a host's bulk round.
        request = actions.pending_request(meta.get("annotations"), status.get("lastAction")) if full else None
        grace = float(spec.termination_grace_period_seconds)
        redefine = plan.RedefinePlan(False, False)
        macs: dict[str, str] | None = None
        booted: domains.Booted | None = None
        if full:
            dtype = plan.domain_type_for(spec.domain_type, hv.domain_types, status.get("domainType"))
            status["domainType"] = dtype
            # Placed just now where the search showed no domain of it: nothing to look up.
            details = None if stage.placed_fresh else await conn.call("get_domain", lambda c: domains.get_domain(c, uid))
            if details is not None and details.observation.name and details.observation.name != dname:
                dname = details.observation.name  # created under an earlier naming scheme: keep it
                status["domainName"] = dname
            creates = spec.cloud_init is not None or any(d.volume is not None for d in spec.disks)
            if details is None and creates:  # before any volume is made: a name taken by another domain stops here
                taken = await conn.call("find_by_name", lambda c: domains.find_by_name(c, dname))
                if taken is not None and taken[0] != uid:
                    raise name_conflict(dname, host, taken[0], taken[1].owner, view)
            if details is not None and not status.get("mediaEjected") and plan.eject_media_now(
                    spec.install_media_policy, _time(status.get("firstBootTime")), False, details.observation):
                eject_media(status, events)
            disks = await resolve_media(spec, namespace, host, hv, conn, view, stage,
                                         ejected=bool(status.get("mediaEjected")))
            try:
                volumes, disks, created_in = await ensure_disk_volumes(spec, uid, hv, conn, disks, events,
                                                                   recorded_volumes(old_status))
            except AppError:
                # Some may exist by now (the first disk's, when the second one's pool fails): say so.
                status["volumes"] = await existing_volumes(spec, uid, hv, conn, recorded_volumes(old_status))
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
                await check_commitment(host, sorted(created_in), conn, status, events, generation)
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
                # The MACs libvirt chose come back with it. With nothing made before, a name another
                # domain holds is found by define itself (libvirt refuses it). A new domain the plan
                # starts anyway boots in the same call.
                boot = details is None and request is None and starts_when_defined(spec.run_strategy, status, now, grace)
                defined = await conn.call("define_start" if boot else "define",
                                          lambda c: domains.define(c, xml, uid, dname, boot=boot))
                if isinstance(defined, domains.NameTaken):
                    raise name_conflict(dname, host, defined.uuid, defined.metadata.owner, view)
                VM_OPERATIONS.labels("create" if details is None else "redefine").inc()
                events.append(("Normal", "Defined" if details is None else "Redefined",
                               f"domain {dname} {'defined' if details is None else 'redefined'} on {host}"))
                details, booted = defined, defined.booted
                observed = details.observation
            macs = details.macs if details else {}
        assert observed is not None

        booted_fresh = not observed.active  # a (re)start uses the current persistent definition
        if request is not None:
            acted = await vm_actions.execute(
                request, spec.run_strategy, grace, observed, conn, uid,
                status, events, now, _pending_writer(rt, namespace, name))
            observed = acted.observed
            booted_fresh = booted_fresh or acted.booted
        crashed = spec.run_strategy != "Halted" and is_crashed(observed)  # as found, before any action
        power = read_power_status(status)
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
                observed = await act(pp.action, conn, uid, booted)
                VM_OPERATIONS.labels(OPERATION_METRIC[pp.action]).inc()
                if pp.action is plan.Action.START:
                    after = dataclasses.replace(after, last_start_time=now, first_boot_time=after.first_boot_time or now)
                    started_event(events, dname, host)
                elif pp.action is plan.Action.SHUTDOWN:
                    events.append(("Normal", "ShuttingDown", f"asked the guest of {dname} to shut down"))
                else:
                    events.append(("Normal", "Stopped", f"domain {dname} powered off"))
            except AppError as err:
                if pp.action is not plan.Action.START or err.code in NOT_GUEST_FAULT:
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
        write_power_status(status, pp.status)

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
        transition_events(old_status, status, events)
        return VmOutcome(status, events, None, requeue)
    except AppError as err:
        return await failed_outcome(err, old_status, status, generation, stage, rt, events)


def _pending_writer(rt: Runtime, namespace: str, name: str) -> Callable[[dict[str, Any]], Awaitable[None]] | None:
    """Writes status.lastAction Pending ahead of a long action (None outside the operator)."""
    if rt.kube is None:
        return None

    async def write(patch: dict[str, Any]) -> None:
        await rt.kube.patch_status("virtualmachines", namespace, name, patch)
    return write

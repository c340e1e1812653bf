"""VirtualMachineMigration handlers: move a running VM to another host, live, once.

The VM's own lock is held for the whole move, so its reconcile keeps off the domain while libvirt
moves it (and a host round's look from before the move does not count after it). status.migrationTargetHost on the VM is written before the copy starts
and status.host after libvirt has switched (reconcile.vm_migration.settle covers an operator killed in
between). A failure is rolled back by libvirt (the domain keeps running on the source) and reported
with MIGRATION_FAILED; the migration is not retried (create a new object)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from typing import Any

import kopf
import pydantic

from ..adapters.libvirt import domains, migrate_vm
from ..adapters.libvirt.migration import MigrationProgress
from ..core.api.common import GROUP, VERSION
from ..core.api.vm import VirtualMachineSpec
from ..core.conditions import summarize, timestamp
from ..core.errors import AppError, ErrorCode
from ..core.logs import get_logger
from ..core.metrics import MIGRATION_SECONDS, MIGRATIONS
from ..reconcile import plan, vm_seed
from ..reconcile.failures import human_message
from ..reconcile.vm_media import resolve_media
from ..reconcile.vm_failover import STALE_HOSTS
from ..reconcile.vm_migration import TARGET, target_host
from ..reconcile.vm_types import Stage
from .instrument import reconciler
from .snapshot_common import connection_to, error_fields
from .startup import runtime_of
from .vm import state_of as vm_state

log = get_logger(__name__)
MIGRATIONS_PLURAL, VMS = "virtualmachinemigrations", "virtualmachines"
PROGRESS_EVERY_SECONDS = 2.0
ABORT_GRACE_SECONDS = 90.0   # after the timeout: libvirt's abort, then the call returns


@kopf.on.resume(GROUP, VERSION, MIGRATIONS_PLURAL)
@kopf.on.create(GROUP, VERSION, MIGRATIONS_PLURAL)
@reconciler("virtualmachinemigration", "VirtualMachineMigration")
async def migrate(body: kopf.Body, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status, memo: kopf.Memo,
                  **_: Any) -> None:
    rt = runtime_of(memo)
    st = vm_state(rt)
    current = dict(status or {})
    if current.get("phase") in ("Succeeded", "Failed") or meta.get("deletionTimestamp"):
        return  # runs once
    namespace, name = meta["namespace"], meta["name"]
    generation = int(meta.get("generation") or 0)
    vm_name = spec.get("vmName", "")
    new: dict[str, Any] = dict(current)
    started = time.perf_counter()
    try:
        if current.get("phase") == "Running":
            # The operator restarted during the copy: libvirt finished or rolled it back; the VM's own
            # reconcile settles where it runs (status.migrationTargetHost).
            raise AppError(ErrorCode.MIGRATION_FAILED, "interrupted by an operator restart; the VM's status.host "
                                                       "says where it runs now")
        vm = await rt.kube.get_object(VMS, vm_name, namespace)
        if vm is None:
            raise AppError(ErrorCode.MIGRATION_FAILED, f"VirtualMachine {vm_name} does not exist")
        uid = vm["metadata"]["uid"]
        try:
            vm_spec = VirtualMachineSpec.model_validate(vm.get("spec") or {})
        except pydantic.ValidationError as err:
            raise AppError(ErrorCode.MIGRATION_FAILED, f"VirtualMachine {vm_name} has an invalid spec") from err
        if vm_spec.host_ref is not None:
            raise AppError(ErrorCode.MIGRATION_FAILED, f"VirtualMachine {vm_name} is pinned by hostRef "
                                                       f"{vm_spec.host_ref}: it cannot move")
        source = (vm.get("status") or {}).get("host")
        if not source or vm["metadata"].get("deletionTimestamp"):
            raise AppError(ErrorCode.MIGRATION_FAILED, f"VirtualMachine {vm_name} is not placed on a host (or is "
                                                       "being deleted)")
        view = st.view(rt)
        target = target_host(vm_spec, source, spec.get("targetHost"), view, uid, namespace,
                             avoid=set((vm.get("status") or {}).get(STALE_HOSTS) or []))
        new.update({"vmUid": uid, "sourceHost": source, "targetHost": target})
        src, dst = await connection_to(rt, source), await connection_to(rt, target)
        target_view = plan.HostView.from_object(view.hosts[target])
        source_view = plan.HostView.from_object(view.hosts[source])
        async with st.lock(uid):
            vm = st.vms.get(uid) or vm
            if (vm.get("status") or {}).get("host") != source:
                raise AppError(ErrorCode.MIGRATION_FAILED, f"VirtualMachine {vm_name} moved meanwhile")
            observed = await src.call("get_domain", lambda c: domains.get_domain(c, uid))
            if observed is None or not observed.observation.active:
                raise AppError(ErrorCode.MIGRATION_FAILED, f"VirtualMachine {vm_name} is not running on {source}: "
                                                           "only a running VM migrates (a stopped one: delete and "
                                                           "recreate it, or use hostFailurePolicy)")
            # Its read-only media on the target: the ISOImages (imported there) and the cloud-init seed.
            disks = await resolve_media(vm_spec, namespace, target, target_view, dst, view, Stage(),
                                         ejected=bool((vm.get("status") or {}).get("mediaEjected")))
            paths = {d.name: d.path for d in disks if d.device == "cdrom" and d.path}
            seed = await vm_seed.attach_seed(vm_spec, namespace, vm_name, uid, target_view, dst, rt)
            if seed is not None and seed.disk.path:
                paths[seed.disk.name] = seed.disk.path
            await _patch_vm(rt, st, vm, {TARGET: target})
            new.update({"phase": "Running", "startTime": timestamp(), "error": None})
            new["conditions"] = summarize(new.get("conditions") or [], ready=False, reason="Running",
                                          message=f"moving {vm_name} from {source} to {target}",
                                          generation=generation, reconciling=True)
            await rt.kube.patch_status(MIGRATIONS_PLURAL, namespace, name, new)
            kopf.event(vm, type="Normal", reason="MigrationStarted", message=f"live migration to {target} started")
            try:
                result = await _run(rt, src, dst, uid, view.hosts[target], paths, source_view, spec, namespace, name)
            except AppError as err:
                if err.context.get("unsettled"):
                    raise  # libvirt may still switch: status.migrationTargetHost stays for settle()
                # libvirt rolled back: still on the source. Volumes the target could not take back (it went
                # away) are removed when it answers again, like a fenced host's stale copy; the rest now.
                patch: dict[str, Any] = {TARGET: None}
                if err.context.get("leftOnTarget"):
                    stale = set((st.vms.get(uid) or vm).get("status", {}).get(STALE_HOSTS) or [])
                    patch[STALE_HOSTS] = sorted(stale | {target})
                else:
                    await _delete_leftovers(dst, uid, target_view)
                await _patch_vm(rt, st, vm, patch)
                raise
            await _patch_vm(rt, st, vm, {"host": target, TARGET: None})
            try:  # what stayed on the source: its local volumes (the domain is undefined there already)
                await src.call("remove_stale_copy",
                               lambda c: domains.remove_stale_copy(c, uid, source_view.shared_pools))
            except AppError as err:
                log.warning("source volumes of a migrated VM not deleted", uid=uid, host=source, code=err.code.value)
        st.retry.add(uid)  # the VM's reconcile refreshes its status on the new host
    except AppError as err:
        outcome = "failed" if new.get("phase") == "Running" else "refused"
        MIGRATIONS.labels(outcome).inc()
        if outcome == "failed":
            MIGRATION_SECONDS.labels("failed").observe(time.perf_counter() - started)
        await _failed(rt, body, new, err, generation)
        return
    MIGRATIONS.labels("succeeded").inc()
    MIGRATION_SECONDS.labels("succeeded").observe(time.perf_counter() - started)
    message = f"{vm_name} moved from {source} to {target} in {result.seconds:.1f}s"
    new.update({"phase": "Succeeded", "endTime": timestamp(), "downtimeMs": result.downtime_ms, "error": None,
                "observedGeneration": generation})
    new["conditions"] = summarize(new.get("conditions") or [], ready=True, reason="Succeeded", message=message,
                                  generation=generation)
    await rt.kube.patch_status(MIGRATIONS_PLURAL, namespace, name, new)
    kopf.event(body, type="Normal", reason="Migrated", message=message)
    kopf.event(vm, type="Normal", reason="Migrated", message=message)


async def _run(rt: Any, src: Any, dst: Any, uid: str, target_obj: Mapping[str, Any], paths: dict[str, str],
               source_view: plan.HostView, spec: Mapping[str, Any], namespace: str, name: str) -> Any:
    """The copy, off the loop on the source host's thread (a stream slot: it runs for seconds to minutes),
    with its progress written to the migration's status every few seconds."""
    loop = asyncio.get_running_loop()
    latest: dict[str, MigrationProgress] = {}
    cancel = threading.Event()
    target_uri = (target_obj.get("spec") or {}).get("uri", "")
    timeout = float(spec.get("timeoutSeconds") or 600)
    bandwidth = spec.get("bandwidthMibPerSecond")
    shared = source_view.shared_pools & plan.HostView.from_object(target_obj).shared_pools
    # The target's connection, held open for the migration thread until it ends (even past our wait).
    dest = await dst.lease("migration.target")

    def migrate_blocking(c: Any) -> Any:
        try:
            return migrate_vm.run(c, dest.begin(), uid, target_uri, paths, frozenset(shared), bandwidth_mib=bandwidth,
                                  timeout=timeout, cancel=cancel,
                                  on_progress=lambda p: loop.call_soon_threadsafe(latest.__setitem__, "p", p))
        finally:
            dest.release()

    async def report() -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_SECONDS)
            p = latest.get("p")
            if p is None:
                continue
            progress = {"stage": p.phase, "dataProcessedBytes": p.data_processed, "dataTotalBytes": p.data_total,
                        "elapsedSeconds": round(p.elapsed, 1)}
            try:
                await rt.kube.patch_status(MIGRATIONS_PLURAL, namespace, name, {"progress": progress})
            except AppError:
                pass

    reporter = asyncio.create_task(report())
    try:
        return await src.call("migrate", migrate_blocking, timeout=timeout + ABORT_GRACE_SECONDS, stream=True)
    except asyncio.CancelledError:
        cancel.set()  # the operator stops: libvirt aborts the job and the domain stays on the source
        raise
    except AppError as err:
        if err.code is not ErrorCode.LIBVIRT_TIMEOUT:
            raise
        # Our wait ended, libvirt's job may not have: abort it, and let settle() find where the domain is.
        cancel.set()
        raise AppError(ErrorCode.MIGRATION_FAILED, f"no answer from libvirt within the timeout ({err.message}); the "
                                                   "job was aborted, and the VM's host is decided from where libvirt "
                                                   "has the domain", {"unsettled": "1"}) from err
    finally:
        reporter.cancel()
        dest.release_unused()  # the thread never began (no slot on the source, connection lost): ours to free


async def _delete_leftovers(dst: Any, uid: str, target_view: plan.HostView) -> None:
    """A rolled-back migration: the seed uploaded for it and anything libvirt left on the target."""
    try:
        deleted = await dst.call("delete_leftovers",
                                 lambda c: domains.delete_leftovers(c, uid, target_view.shared_pools))
    except AppError as err:
        log.warning("leftovers of a failed migration not deleted", uid=uid, host=target_view.name,
                    code=err.code.value)
        return
    if deleted:
        log.info("leftovers of a failed migration deleted", uid=uid, host=target_view.name, volumes=deleted)


async def _patch_vm(rt: Any, st: Any, vm: dict[str, Any], patch: dict[str, Any]) -> None:
    meta = vm["metadata"]
    st.remember(await rt.kube.patch_status(VMS, meta["namespace"], meta["name"], patch))


async def _failed(rt: Any, body: Mapping[str, Any], new: dict[str, Any], err: AppError, generation: int) -> None:
    meta = body["metadata"]
    previous = (body.get("status") or {}).get("error")
    error = await error_fields(rt, err, previous, "VirtualMachineMigration")
    text = human_message(err, {"remediation": error["remediation"]})
    new.update({"phase": "Failed", "endTime": timestamp(), "error": error, "observedGeneration": generation,
                "progress": None})
    new["conditions"] = summarize(new.get("conditions") or [], ready=False, reason=err.reason, message=text,
                                  generation=generation, stalled=True)
    try:
        await rt.kube.patch_status(MIGRATIONS_PLURAL, meta["namespace"], meta["name"], new)
    except AppError as patch_err:
        log.info("migration status not written", code=patch_err.code.value, error=patch_err.message)
    kopf.event(body, type="Warning", reason=err.reason, message=text)

"""VirtualMachineSnapshot and VirtualMachineRestore handlers.

* A snapshot is taken once (create/resume until readyToUse), under the VM's lock (the VM reconcile
  neither redefines nor starts/stops the domain meanwhile); deleting the object deletes the libvirt
  snapshot on the host (kopf's finalizer holds the object until then).
* A restore runs once, when its VM is stopped and will stay stopped (runStrategy Halted, or Manual/Once
  and shut off); otherwise it waits with Ready=False reason TargetRunning and is retried, for at most
  5 minutes by default (spec.targetReadinessPolicy, KubeVirt's). The spec is never changed; the VM
  reconcile is woken afterwards (libvirt reverts the definition too).
* Deleting a VM deletes its volumes, and the internal snapshots inside them, with it: its snapshots
  turn Failed (SNAPSHOT_SOURCE_NOT_FOUND) and their deletion has nothing left to do on the host.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import kopf

from ..adapters.libvirt import domains, snapshots
from ..core.api.common import FORCE_RELEASE_ANNOTATION, GROUP, VERSION
from ..core.conditions import STALLED, is_true, now as utcnow, summarize, timestamp
from ..core.errors import AppError, ErrorCode
from ..core.logs import get_logger
from ..core.metrics import SNAPSHOT_OPERATION_SECONDS, SNAPSHOT_OPERATIONS
from ..core.snapshot import libvirt_snapshot_name
from ..reconcile import snapshot as plan
from ..reconcile.failures import error_status, human_message
from ..reconcile.host import host_connection
from ..reconcile.runtime import Runtime
from .instrument import reconciler
from .startup import runtime_of
from .vm import state_of as vm_state

log = get_logger(__name__)
SNAPSHOTS, RESTORES, VMS, HOSTS = "virtualmachinesnapshots", "virtualmachinerestores", "virtualmachines", "libvirthosts"
HOST_CALL_TIMEOUT = 300.0  # an online snapshot writes the guest's memory; a revert reads it back
RETRY_CAP_SECONDS = 30.0
_REFUSED = {ErrorCode.SNAPSHOT_UNSUPPORTED, ErrorCode.RESTORE_TARGET_RUNNING}


class _Final(Exception):
    """A refusal nothing but a new object can change: reported, never retried."""

    def __init__(self, error: AppError) -> None:
        super().__init__(error.message)
        self.error = error


def _created(meta: Mapping[str, Any]) -> dt.datetime | None:
    value = meta.get("creationTimestamp")
    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")) if value else None


def _delay(retry: int) -> float:
    return min(RETRY_CAP_SECONDS, 2.0 * 2 ** min(retry, 4))


async def _error(rt: Runtime, err: AppError, previous: Mapping[str, Any] | None, kind: str) -> dict[str, Any]:
    """KubeVirt's error {message, time} plus our code, context and runbook links."""
    before = {"code": previous.get("code"), "since": previous.get("time")} if previous else None
    state = await error_status(err, before, kind, rt.remediator)
    return {"code": state["code"], "message": state["message"], "time": state["since"],
            "context": state["context"], "remediation": state["remediation"]}


@contextlib.asynccontextmanager
async def _holding_vm(rt: Runtime, vm_uid: str) -> AsyncIterator[None]:
    """The VM's own lock (handlers.vm): its reconcile and host rounds keep off the domain meanwhile."""
    async with vm_state(rt).lock(vm_uid):
        yield


async def _connection(rt: Runtime, host: str) -> Any:
    host_obj = await rt.kube.get_object(HOSTS, host)
    if host_obj is None:
        raise AppError(ErrorCode.HOST_NOT_FOUND, f"LibvirtHost {host} does not exist", {"host": host})
    conn = await host_connection(rt, host, host_obj)
    if conn is None:
        raise AppError(ErrorCode.HOST_UNREACHABLE, f"no connection to LibvirtHost {host} yet", {"host": host})
    return conn


def _measure(operation: str, started: float, outcome: str) -> None:
    SNAPSHOT_OPERATION_SECONDS.labels(operation).observe(time.perf_counter() - started)
    SNAPSHOT_OPERATIONS.labels(operation, outcome).inc()


# --------------------------------------------------------------------------------------------
# VirtualMachineSnapshot
# --------------------------------------------------------------------------------------------

@kopf.on.resume(GROUP, VERSION, SNAPSHOTS)
@kopf.on.create(GROUP, VERSION, SNAPSHOTS)
@reconciler("virtualmachinesnapshot", "VirtualMachineSnapshot")
async def take_snapshot(body: kopf.Body, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status, memo: kopf.Memo,
                        retry: int, **_: Any) -> None:
    rt = runtime_of(memo)
    current = dict(status or {})
    if current.get("readyToUse") or current.get("phase") == "Failed" or meta.get("deletionTimestamp"):
        return  # taken (or failed for good): a snapshot is never taken twice
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    generation = int(meta.get("generation") or 0)
    vm_name = (spec.get("source") or {}).get("name", "")
    started = time.perf_counter()
    new = dict(current)
    try:
        vm = await rt.kube.get_object(VMS, vm_name, namespace)
        if vm is None or vm["metadata"].get("deletionTimestamp"):
            raise AppError(ErrorCode.SNAPSHOT_SOURCE_NOT_FOUND,
                           f"VirtualMachine {vm_name} {'does not exist' if vm is None else 'is being deleted'}")
        vm_uid, vm_status = vm["metadata"]["uid"], vm.get("status") or {}
        if current.get("sourceUid") and current["sourceUid"] != vm_uid:
            raise _Final(AppError(ErrorCode.SNAPSHOT_SOURCE_NOT_FOUND,
                                  f"VirtualMachine {vm_name} was recreated while the snapshot was being taken"))
        host = vm_status.get("host")
        if not host or vm_status.get("domainUUID") != vm_uid:
            raise AppError(ErrorCode.SNAPSHOT_SOURCE_NOT_FOUND, f"VirtualMachine {vm_name} is not on a host yet")
        lv_name = libvirt_snapshot_name(uid)
        # Where the snapshot will be, recorded before it exists: the deletion looks there.
        new.update({"phase": "InProgress", "readyToUse": False, "sourceUid": vm_uid, "host": host,
                    "snapshotName": lv_name})
        new["conditions"] = summarize(current.get("conditions") or [], ready=False, reason="InProgress",
                                      message=f"taking a snapshot of VirtualMachine {vm_name} on {host}",
                                      generation=generation, reconciling=True)
        await rt.kube.patch_status(SNAPSHOTS, namespace, name, new)
        conn = await _connection(rt, host)
        async with _holding_vm(rt, vm_uid):
            view = await conn.call("snapshot.view", lambda c: snapshots.snapshot_view(c, vm_uid))
            if view is None:
                raise AppError(ErrorCode.SNAPSHOT_SOURCE_NOT_FOUND,
                               f"VirtualMachine {vm_name} has no domain on {host} yet", {"host": host})
            chosen = plan.plan_snapshot(view, host)
            xml = snapshots.snapshot_xml(lv_name, f"VirtualMachineSnapshot {namespace}/{name} of VirtualMachine "
                                                  f"{vm_name}", chosen.disks, chosen.skipped, chosen.online)
            created = await conn.call("snapshot.create", lambda c: snapshots.create(
                c, vm_uid, lv_name, xml, chosen.disks, chosen.online), timeout=HOST_CALL_TIMEOUT)
        if created is None:
            raise AppError(ErrorCode.SNAPSHOT_SOURCE_NOT_FOUND, f"VirtualMachine {vm_name}'s domain is gone from {host}")
    except _Final as final:
        _measure("create", started, "failed")
        await _snapshot_failed(rt, body, new, final.error, generation, final=True)
        return
    except AppError as err:
        _measure("create", started, "refused" if err.code in _REFUSED else "failed")
        await _snapshot_failed(rt, body, new, err, generation, final=not err.retryable)
        if err.retryable:
            raise kopf.TemporaryError(err.message, delay=_delay(retry)) from err
        return
    _measure("create", started, "succeeded")
    by_target = {d.target: d for d in chosen.disks}
    disks = [{"name": by_target[u.target].name or u.target, "target": u.target,
              **({"volume": u.volume} if u.volume else {}),
              **({"capacityBytes": u.capacity} if u.capacity is not None else {}),
              **({"allocationBytes": u.allocation} if u.allocation is not None else {})}
             for u in created.disks]
    kind = "Online" if created.online else "Offline"
    message = (f"snapshot of {len(disks)} disk(s) ({', '.join(d['name'] for d in disks)}) on {new['host']}"
               + ("; taken while running (the guest's memory was saved alongside)" if created.online else ""))
    new.update({"phase": "Succeeded", "readyToUse": True, "creationTime": current.get("creationTime") or timestamp(),
                "indications": [kind], "disks": disks, "sizeBytes": plan.snapshot_size(disks),
                "observedGeneration": generation, "error": None})
    new["conditions"] = summarize(new["conditions"], ready=True, reason="Succeeded", message=message,
                                  generation=generation)
    await rt.kube.patch_status(SNAPSHOTS, namespace, name, new)
    if not created.existed:
        kopf.event(body, type="Normal", reason="SnapshotCreated", message=message)


async def _snapshot_failed(rt: Runtime, body: Mapping[str, Any], new: dict[str, Any], err: AppError,
                           generation: int, *, final: bool) -> None:
    meta = body["metadata"]
    previous = (body.get("status") or {}).get("error")
    error = await _error(rt, err, previous, "VirtualMachineSnapshot")
    text = human_message(err, {"remediation": error["remediation"]})
    new.update({"phase": "Failed" if final else "InProgress", "readyToUse": False, "error": error,
                "observedGeneration": generation})
    new["conditions"] = summarize(new.get("conditions") or [], ready=False, reason=err.reason, message=text,
                                  generation=generation, reconciling=not final, stalled=final)
    try:
        await rt.kube.patch_status(SNAPSHOTS, meta["namespace"], meta["name"], new)
    except AppError as patch_err:
        log.info("snapshot status not written", code=patch_err.code.value, error=patch_err.message)
    if (previous or {}).get("code") != err.code.value:
        kopf.event(body, type="Warning", reason=err.reason, message=text)


@kopf.on.delete(GROUP, VERSION, SNAPSHOTS)
@reconciler("virtualmachinesnapshot", "VirtualMachineSnapshot")
async def delete_snapshot(body: kopf.Body, meta: kopf.Meta, status: kopf.Status, memo: kopf.Memo, retry: int,
                          **_: Any) -> None:
    """Delete the libvirt snapshot (found by this object's uid on the domain of the VM it was taken of)."""
    rt = runtime_of(memo)
    current = dict(status or {})
    vm_uid, host = current.get("sourceUid"), current.get("host")
    if not vm_uid or not host:
        return  # never got as far as the host
    force = (meta.get("annotations") or {}).get(FORCE_RELEASE_ANNOTATION) == "true"
    started = time.perf_counter()
    lv_name = libvirt_snapshot_name(meta["uid"])
    try:
        conn = await _connection(rt, host)
        async with _holding_vm(rt, vm_uid):
            deleted = await conn.call("snapshot.delete", lambda c: snapshots.delete(c, vm_uid, lv_name),
                                      timeout=HOST_CALL_TIMEOUT)
    except AppError as err:
        _measure("delete", started, "failed")
        if force or err.code is ErrorCode.HOST_NOT_FOUND:
            kopf.event(body, type="Warning", reason="ForceReleased",
                       message=f"released without deleting snapshot {lv_name} on {host}: {err.message}")
            return
        text = human_message(err)
        kopf.event(body, type="Warning", reason="DeletionBlocked", message=text)
        raise kopf.TemporaryError(text, delay=_delay(retry)) from err
    _measure("delete", started, "succeeded")
    if deleted:
        kopf.event(body, type="Normal", reason="SnapshotDeleted", message=f"snapshot {lv_name} deleted on {host}")


@kopf.on.event(GROUP, VERSION, VMS)
async def watch_snapshot_sources(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A deleted VM took its volumes, and the snapshots inside them, along: its snapshots turn Failed."""
    if type != "DELETED":
        return
    rt = runtime_of(memo)
    meta = body.get("metadata") or {}
    try:
        objs = await rt.kube.list_objects(SNAPSHOTS, meta.get("namespace"))
    except AppError as err:
        log.info("snapshots of a deleted VM not listed", code=err.code.value, error=err.message)
        return
    for obj in objs:
        status = obj.get("status") or {}
        if status.get("sourceUid") != meta.get("uid") or status.get("phase") == "Failed":
            continue
        err = AppError(ErrorCode.SNAPSHOT_SOURCE_NOT_FOUND,
                       f"VirtualMachine {meta.get('name')} was deleted: its disks, and this snapshot inside them, "
                       "were removed from the host with it")
        generation = int(obj["metadata"].get("generation") or 0)
        with contextlib.suppress(AppError):
            await _snapshot_failed(rt, obj, dict(status), err, generation, final=True)


# --------------------------------------------------------------------------------------------
# VirtualMachineRestore
# --------------------------------------------------------------------------------------------

@kopf.on.resume(GROUP, VERSION, RESTORES)
@kopf.on.create(GROUP, VERSION, RESTORES)
@reconciler("virtualmachinerestore", "VirtualMachineRestore")
async def restore(body: kopf.Body, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status, memo: kopf.Memo,
                  retry: int, **_: Any) -> None:
    rt = runtime_of(memo)
    current = dict(status or {})
    if current.get("complete") or is_true(current.get("conditions"), STALLED) or meta.get("deletionTimestamp"):
        return  # done (or refused for good): a restore runs once
    namespace, name = meta["namespace"], meta["name"]
    generation = int(meta.get("generation") or 0)
    target = (spec.get("target") or {}).get("name", "")
    snap_name = spec.get("virtualMachineSnapshotName", "")
    started = time.perf_counter()
    new = dict(current)
    try:
        snap = await rt.kube.get_object(SNAPSHOTS, snap_name, namespace)
        vm = await rt.kube.get_object(VMS, target, namespace)
        refusal = plan.check_restore(target, vm, snap, snap_name)
        if refusal is not None:
            raise _Final(refusal.error) if refusal.final else refusal.error
        assert snap is not None and vm is not None
        vm_uid, sstatus = vm["metadata"]["uid"], snap.get("status") or {}
        host = sstatus["host"]
        new["targetUid"] = vm_uid
        conn = await _connection(rt, host)
        async with _holding_vm(rt, vm_uid):
            # Fresh under the lock: the VM's runStrategy and power state as they are now.
            vm = await rt.kube.get_object(VMS, target, namespace) or vm
            observed = await conn.call("snapshot.state", lambda c: domains.state(c, vm_uid))
            if not observed.exists:
                raise _Final(AppError(ErrorCode.SNAPSHOT_NOT_FOUND,
                                      f"VirtualMachine {target} has no domain on {host}: nothing to restore onto"))
            refused = plan.restore_refusal((vm.get("spec") or {}).get("runStrategy") or "Always", observed.active,
                                           target)
            if refused is not None:
                policy = spec.get("targetReadinessPolicy") or "WaitGracePeriod"
                if plan.restore_gives_up(policy, _created(meta), utcnow()):
                    raise _Final(AppError(refused.code, f"{refused.message.split(':')[0]}; gave up "
                                          f"(targetReadinessPolicy {policy}): create a new restore once it is stopped",
                                          refused.context))
                raise refused
            lv_name = sstatus.get("snapshotName") or libvirt_snapshot_name(snap["metadata"]["uid"])
            reverted = await conn.call("snapshot.revert", lambda c: snapshots.revert(c, vm_uid, lv_name),
                                       timeout=HOST_CALL_TIMEOUT)
            if not reverted.found:
                raise _Final(AppError(ErrorCode.SNAPSHOT_NOT_FOUND,
                                      f"snapshot {lv_name} no longer exists on {host}", {"host": host}))
        vm_state(rt).retry.schedule(vm_uid, 0)  # the VM reconcile checks the (reverted) definition against the spec
    except _Final as final:
        _measure("restore", started, "failed")
        await _restore_failed(rt, body, new, final.error, generation, final=True)
        return
    except AppError as err:
        _measure("restore", started, "refused" if err.code in _REFUSED else "failed")
        await _restore_failed(rt, body, new, err, generation, final=not err.retryable)
        if err.retryable:
            raise kopf.TemporaryError(err.message, delay=_delay(retry)) from err
        return
    _measure("restore", started, "succeeded")
    names = {d.get("target"): d.get("name") for d in sstatus.get("disks") or []}
    restored = [{"name": names.get(t) or t, "target": t} for t in reverted.targets]
    message = (f"VirtualMachine {target}'s disks ({', '.join(r['name'] for r in restored)}) are back to snapshot "
               f"{snap_name}" + ("; the memory saved with the online snapshot was discarded" if reverted.online else ""))
    new.update({"complete": True, "restoreTime": timestamp(), "restores": restored, "error": None,
                "observedGeneration": generation})
    new["conditions"] = summarize(new.get("conditions") or [], ready=True, reason="Succeeded", message=message,
                                  generation=generation)
    await rt.kube.patch_status(RESTORES, namespace, name, new)
    kopf.event(body, type="Normal", reason="RestoreComplete", message=message)


async def _restore_failed(rt: Runtime, body: Mapping[str, Any], new: dict[str, Any], err: AppError,
                          generation: int, *, final: bool) -> None:
    meta = body["metadata"]
    previous = (body.get("status") or {}).get("error")
    error = await _error(rt, err, previous, "VirtualMachineRestore")
    text = human_message(err, {"remediation": error["remediation"]})
    new.update({"complete": False, "error": error, "observedGeneration": generation})
    new["conditions"] = summarize(new.get("conditions") or [], ready=False, reason=err.reason, message=text,
                                  generation=generation, reconciling=not final, stalled=final)
    try:
        await rt.kube.patch_status(RESTORES, meta["namespace"], meta["name"], new)
    except AppError as patch_err:
        log.info("restore status not written", code=patch_err.code.value, error=patch_err.message)
    if (previous or {}).get("code") != err.code.value:
        kopf.event(body, type="Warning", reason=err.reason, message=text)

"""VirtualMachineSnapshot handlers (restores: handlers.restore; shared helpers: handlers.snapshot_common).

* A snapshot is taken once (create/resume until readyToUse), under the VM's lock (the VM reconcile
  neither redefines nor starts/stops the domain meanwhile); deleting the object deletes the libvirt
  snapshot on the host (kopf's finalizer holds the object until then).
* Deleting a VM deletes its volumes, and the internal snapshots inside them, with it: its snapshots
  turn Failed (SNAPSHOT_SOURCE_NOT_FOUND) and their deletion has nothing left to do on the host.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from typing import Any

import kopf

from ..adapters.libvirt import snapshots
from ..core.api.common import FORCE_RELEASE_ANNOTATION, GROUP, VERSION
from ..core.conditions import summarize, timestamp
from ..core.errors import AppError, ErrorCode
from ..core.logs import get_logger
from ..core.snapshot import libvirt_snapshot_name
from ..reconcile import snapshot as plan
from ..reconcile.failures import human_message
from ..reconcile.runtime import Runtime
from .instrument import reconciler
from .startup import runtime_of
from .vm_state import VM_DELETED_HOOKS
from .snapshot_common import (
    HOST_CALL_TIMEOUT, SNAPSHOTS, VMS, FinalError, REFUSED_CODES, connection_to, retry_delay, error_fields, holding_vm, measure,
)

log = get_logger(__name__)


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
            raise FinalError(AppError(ErrorCode.SNAPSHOT_SOURCE_NOT_FOUND,
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
        conn = await connection_to(rt, host)
        async with holding_vm(rt, vm_uid):
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
    except FinalError as final:
        measure("create", started, "failed")
        await _snapshot_failed(rt, body, new, final.error, generation, final=True)
        return
    except AppError as err:
        measure("create", started, "refused" if err.code in REFUSED_CODES else "failed")
        await _snapshot_failed(rt, body, new, err, generation, final=not err.retryable)
        if err.retryable:
            raise kopf.TemporaryError(err.message, delay=retry_delay(retry)) from err
        return
    measure("create", started, "succeeded")
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
    error = await error_fields(rt, err, previous, "VirtualMachineSnapshot")
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
        conn = await connection_to(rt, host)
        async with holding_vm(rt, vm_uid):
            deleted = await conn.call("snapshot.delete", lambda c: snapshots.delete(c, vm_uid, lv_name),
                                      timeout=HOST_CALL_TIMEOUT)
    except AppError as err:
        measure("delete", started, "failed")
        if force or err.code is ErrorCode.HOST_NOT_FOUND:
            kopf.event(body, type="Warning", reason="ForceReleased",
                       message=f"released without deleting snapshot {lv_name} on {host}: {err.message}")
            return
        text = human_message(err)
        kopf.event(body, type="Warning", reason="DeletionBlocked", message=text)
        raise kopf.TemporaryError(text, delay=retry_delay(retry)) from err
    measure("delete", started, "succeeded")
    if deleted:
        kopf.event(body, type="Normal", reason="SnapshotDeleted", message=f"snapshot {lv_name} deleted on {host}")


@kopf.index(GROUP, VERSION, SNAPSHOTS, id="live_snapshot_namespaces")
async def live_snapshot_namespaces(name: str, namespace: str, status: kopf.Status, **_: Any) -> dict[str, str] | None:
    """The namespaces that hold snapshots not Failed: a VM deleted elsewhere lists none (a 1,000-VM
    deletion made 1,000 LISTs). Where there are some, they are listed as they are now, not as the
    index last saw them (a snapshot that just got its source is not missed)."""
    return {namespace: name} if status.get("phase") != "Failed" else None


async def fail_snapshots_of_deleted_vm(rt: Runtime, body: Mapping[str, Any], indexes: Mapping[str, Any]) -> None:
    """A deleted VM took its volumes, and the snapshots inside them, along: its snapshots turn Failed."""
    meta = body.get("metadata") or {}
    index = indexes.get("live_snapshot_namespaces")
    if index is not None and meta.get("namespace") not in index:
        return
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


VM_DELETED_HOOKS.append(fail_snapshots_of_deleted_vm)

"""VirtualMachineRestore handlers.

* A restore runs once, when its VM is stopped and will stay stopped (runStrategy Halted, or Manual/Once
  and shut off); otherwise it waits with Ready=False reason TargetRunning and is retried, for at most
  5 minutes by default (spec.targetReadinessPolicy, KubeVirt's). The spec is never changed; the VM
  reconcile is woken afterwards (libvirt reverts the definition too).

The helpers shared with snapshots (the VM's lock, the host connection, errors, metrics) live in
handlers.snapshot_common.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import kopf

from ..adapters.libvirt import domains, snapshots
from ..core.api.common import GROUP, VERSION
from ..core.conditions import STALLED, is_true, now as utcnow, summarize, timestamp
from ..core.errors import AppError, ErrorCode
from ..core.logs import get_logger
from ..core.snapshot import libvirt_snapshot_name
from ..reconcile import snapshot as plan
from ..reconcile.failures import human_message
from ..reconcile.runtime import Runtime
from .instrument import reconciler
from .startup import runtime_of
from .snapshot_common import (
    HOST_CALL_TIMEOUT, RESTORES, SNAPSHOTS, VMS, REFUSED_CODES, FinalError, connection_to, created_time, retry_delay, error_fields, holding_vm,
    measure,
)
from .vm import state_of as vm_state

log = get_logger(__name__)


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
            raise FinalError(refusal.error) if refusal.final else refusal.error
        assert snap is not None and vm is not None
        vm_uid, sstatus = vm["metadata"]["uid"], snap.get("status") or {}
        host = sstatus["host"]
        new["targetUid"] = vm_uid
        conn = await connection_to(rt, host)
        async with holding_vm(rt, vm_uid):
            # Fresh under the lock: the VM's runStrategy and power state as they are now.
            vm = await rt.kube.get_object(VMS, target, namespace) or vm
            observed = await conn.call("snapshot.state", lambda c: domains.state(c, vm_uid))
            if not observed.exists:
                raise FinalError(AppError(ErrorCode.SNAPSHOT_NOT_FOUND,
                                      f"VirtualMachine {target} has no domain on {host}: nothing to restore onto"))
            refused = plan.restore_refusal((vm.get("spec") or {}).get("runStrategy") or "Always", observed.active,
                                           target)
            if refused is not None:
                policy = spec.get("targetReadinessPolicy") or "WaitGracePeriod"
                if plan.restore_gives_up(policy, created_time(meta), utcnow()):
                    raise FinalError(AppError(refused.code, f"{refused.message.split(':')[0]}; gave up "
                                          f"(targetReadinessPolicy {policy}): create a new restore once it is stopped",
                                          refused.context))
                raise refused
            lv_name = sstatus.get("snapshotName") or libvirt_snapshot_name(snap["metadata"]["uid"])
            reverted = await conn.call("snapshot.revert", lambda c: snapshots.revert(c, vm_uid, lv_name),
                                       timeout=HOST_CALL_TIMEOUT)
            if not reverted.found:
                raise FinalError(AppError(ErrorCode.SNAPSHOT_NOT_FOUND,
                                      f"snapshot {lv_name} no longer exists on {host}", {"host": host}))
        vm_state(rt).retry.add(vm_uid)  # the VM reconcile checks the (reverted) definition against the spec
    except FinalError as final:
        measure("restore", started, "failed")
        await _restore_failed(rt, body, new, final.error, generation, final=True)
        return
    except AppError as err:
        measure("restore", started, "refused" if err.code in REFUSED_CODES else "failed")
        await _restore_failed(rt, body, new, err, generation, final=not err.retryable)
        if err.retryable:
            raise kopf.TemporaryError(err.message, delay=retry_delay(retry)) from err
        return
    measure("restore", started, "succeeded")
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
    error = await error_fields(rt, err, previous, "VirtualMachineRestore")
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

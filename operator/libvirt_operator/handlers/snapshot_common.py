"""What the VirtualMachineSnapshot and VirtualMachineRestore handlers share: the VM's lock, the host's
connection, the error status, the operation metrics, the retry delay."""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from ..core.errors import AppError, ErrorCode
from ..core.metrics import SNAPSHOT_OPERATION_SECONDS, SNAPSHOT_OPERATIONS
from ..reconcile.failures import error_status
from ..reconcile.host import host_connection
from ..reconcile.runtime import Runtime
from .vm import state_of as vm_state

SNAPSHOTS, RESTORES, VMS, HOSTS = "virtualmachinesnapshots", "virtualmachinerestores", "virtualmachines", "libvirthosts"
HOST_CALL_TIMEOUT = 300.0  # an online snapshot writes the guest's memory; a revert reads it back
RETRY_CAP_SECONDS = 30.0
REFUSED_CODES = {ErrorCode.SNAPSHOT_UNSUPPORTED, ErrorCode.RESTORE_TARGET_RUNNING}


class FinalError(Exception):
    """A refusal nothing but a new object can change: reported, never retried."""

    def __init__(self, error: AppError) -> None:
        super().__init__(error.message)
        self.error = error


def created_time(meta: Mapping[str, Any]) -> dt.datetime | None:
    value = meta.get("creationTimestamp")
    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")) if value else None


def retry_delay(retry: int) -> float:
    return min(RETRY_CAP_SECONDS, 2.0 * 2 ** min(retry, 4))


async def error_fields(rt: Runtime, err: AppError, previous: Mapping[str, Any] | None, kind: str) -> dict[str, Any]:
    """KubeVirt's error {message, time} plus our code, context and runbook links."""
    before = {"code": previous.get("code"), "since": previous.get("time")} if previous else None
    state = await error_status(err, before, kind, rt.remediator)
    return {"code": state["code"], "message": state["message"], "time": state["since"],
            "context": state["context"], "remediation": state["remediation"]}


@contextlib.asynccontextmanager
async def holding_vm(rt: Runtime, vm_uid: str) -> AsyncIterator[None]:
    """The VM's own lock (handlers.vm_state): its reconcile keeps off the domain meanwhile (and ignores what a host round saw before)."""
    async with vm_state(rt).lock(vm_uid):
        yield


async def connection_to(rt: Runtime, host: str) -> Any:
    host_obj = await rt.kube.get_object(HOSTS, host)
    if host_obj is None:
        raise AppError(ErrorCode.HOST_NOT_FOUND, f"LibvirtHost {host} does not exist", {"host": host})
    conn = await host_connection(rt, host, host_obj)
    if conn is None:
        raise AppError(ErrorCode.HOST_UNREACHABLE, f"no connection to LibvirtHost {host} yet", {"host": host})
    return conn


def measure(operation: str, started: float, outcome: str) -> None:
    SNAPSHOT_OPERATION_SECONDS.labels(operation).observe(time.perf_counter() - started)
    SNAPSHOT_OPERATIONS.labels(operation, outcome).inc()

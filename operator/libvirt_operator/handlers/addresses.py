"""Guest IP addresses of running VMs → status.interfaces[].ipAddresses and status.ipAddress.

One daemon per LibvirtHost looks at the host's VMs in the watch cache every TICK_SECONDS (memory
only) and asks libvirt about the ones that are due (reconcile.addresses.PollSchedule: soon after a
start, backing off while no address is known, every minute once known): one call per due VM
(adapters.libvirt.addresses, a few libvirt requests in one thread of the host's pool), at most
CONCURRENCY at a time per host, each bounded by CALL_TIMEOUT_SECONDS. The status is patched only
when the interfaces changed, under the VM's lock (so it never races a reconcile of the same VM);
a stopped domain's addresses are cleared by the VM reconcile itself."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import kopf

from ..adapters.libvirt import addresses as libvirt_addresses
from ..core.api.common import GROUP, VERSION
from ..core.errors import AppError
from ..core.logs import get_logger
from ..reconcile import addresses
from ..reconcile.runtime import Runtime
from ..reconcile.status import merge_patch
from .startup import runtime_of
from .vm import PLURAL, VmState, state_of

log = get_logger(__name__)
TICK_SECONDS = 1.0
CONCURRENCY = 2
CALL_TIMEOUT_SECONDS = 10.0
SCHEDULE_KEY = "address-schedule"


def schedule_of(rt: Runtime) -> addresses.PollSchedule:
    schedule = rt.extras.get(SCHEDULE_KEY)
    if schedule is None:
        schedule = rt.extras[SCHEDULE_KEY] = addresses.PollSchedule()
    return schedule


def _pollable(vm: dict[str, Any] | None, host: str) -> bool:
    if vm is None or vm["metadata"].get("deletionTimestamp"):
        return False
    status = vm.get("status") or {}
    return (status.get("host") == host and status.get("printableStatus") == "Running"
            and bool((vm.get("spec") or {}).get("interfaces")))


def due_vms(st: VmState, schedule: addresses.PollSchedule, host: str, now: float) -> list[str]:
    """The host's running VMs whose addresses should be asked for now (memory only)."""
    schedule.retain(st.vms)
    due = []
    for uid in list(st.on_host.get(host) or ()):
        vm = st.vms.get(uid)
        if not _pollable(vm, host):
            schedule.forget(uid)  # a later run starts a fresh schedule
            continue
        assert vm is not None
        status = vm.get("status") or {}
        if schedule.due(uid, status.get("lastStartTime"), now, known=bool(status.get("ipAddress"))):
            due.append(uid)
    return due


async def poll_vm(rt: Runtime, st: VmState, schedule: addresses.PollSchedule, host: str, conn: Any,
                  uid: str) -> None:
    try:
        observation = await conn.call("interface_addresses",
                                      lambda c: libvirt_addresses.interface_addresses(c, uid),
                                      timeout=CALL_TIMEOUT_SECONDS)
    except AppError as err:
        log.info("asking for a VM's addresses failed", kind="VirtualMachine", uid=uid, host=host,
                 code=err.code.value, error=err.message)
        schedule.polled(uid, time.monotonic(), found=False)
        return
    if observation is None:  # not running (any more): the VM's resync clears its addresses
        return
    for report in observation.reports:
        if report.error:  # e.g. no lease yet, or a host whose ARP table libvirt cannot read
            log.debug("address source failed", kind="VirtualMachine", uid=uid, host=host, source=report.source,
                      error=report.error)
    lock = st.lock(uid)
    if lock.locked():  # a reconcile is on it: ask again shortly rather than wait
        schedule.retry_soon(uid, time.monotonic())
        return
    async with lock:
        vm = st.vms.get(uid)
        if not _pollable(vm, host):
            return
        assert vm is not None
        status = vm.get("status") or {}
        interfaces = addresses.interfaces_status((vm.get("spec") or {}).get("interfaces") or [],
                                                 observation.macs, status.get("interfaces"), running=True,
                                                 observation=observation)
        new = dict(status)
        addresses.put(new, interfaces)
        schedule.polled(uid, time.monotonic(), found=addresses.first_address(interfaces) is not None)
        patch = merge_patch(status, new)
        if not patch:
            return
        meta = vm["metadata"]
        st.remember(await rt.kube.patch_status(PLURAL, meta["namespace"], meta["name"], patch))
        log.info("VM addresses changed", kind="VirtualMachine", namespace=meta["namespace"], name=meta["name"],
                 ip=new.get("ipAddress"))


async def poll_host(rt: Runtime, st: VmState, host: str, conn: Any) -> int:
    """One round for a host; returns how many VMs were asked about."""
    schedule = schedule_of(rt)
    due = due_vms(st, schedule, host, time.monotonic())
    if not due:
        return 0
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(uid: str) -> None:
        async with slots:
            try:
                await poll_vm(rt, st, schedule, host, conn, uid)
            except AppError as err:  # e.g. the status patch failed: the next round tries again
                log.info("writing a VM's addresses failed", kind="VirtualMachine", uid=uid, code=err.code.value,
                         error=err.message)
                schedule.retry_soon(uid, time.monotonic(), after=5.0)

    await asyncio.gather(*(one(uid) for uid in due))
    return len(due)


@kopf.daemon(GROUP, VERSION, "libvirthosts", cancellation_timeout=5.0)
async def host_addresses(name: str, stopped: kopf.DaemonStopped, memo: kopf.Memo, **_: Any) -> None:
    rt = runtime_of(memo)
    st = state_of(rt)
    while not stopped:
        conn = rt.pool.get(name)
        if conn is not None:
            try:
                await poll_host(rt, st, name, conn)
            except Exception:  # noqa: BLE001  (the loop must survive anything)
                log.exception("address round crashed", kind="LibvirtHost", name=name)
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(stopped.wait(), TICK_SECONDS)

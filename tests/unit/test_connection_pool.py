"""The libvirt connection pool: calls run off the event loop, bounded per host, errors classified."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from libvirt_operator.adapters.libvirt import ConnectOptions, HostPool
from libvirt_operator.core.errors import AppError, ErrorCode


async def test_blocking_calls_are_bounded_per_host_and_never_block_the_loop() -> None:
    pool = HostPool()
    conn = await pool.ensure("bounded", ConnectOptions(uri="test:///default", max_concurrent_calls=2))
    running = 0
    peak = 0
    lock = threading.Lock()

    def slow(c):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.1)  # a blocking C call stands in here
        with lock:
            running -= 1
        return c.getHostname()

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    tick_task = asyncio.create_task(ticker())
    results = await asyncio.gather(*(conn.call("slow", slow) for _ in range(8)))
    tick_task.cancel()
    await pool.close_all()
    assert len(results) == 8
    assert peak == 2, f"at most max_concurrent_calls calls may run at once, saw {peak}"
    assert ticks >= 20, "the event loop kept running while libvirt calls blocked their threads"


async def test_libvirt_errors_become_app_errors_with_codes() -> None:
    pool = HostPool()
    conn = await pool.ensure("errors", ConnectOptions(uri="test:///default"))
    with pytest.raises(AppError) as info:
        await conn.call("lookup", lambda c: c.lookupByName("no-such-domain"))
    assert info.value.code == ErrorCode.VM_NOT_FOUND
    assert info.value.context["host"] == "errors" and info.value.context["operation"] == "lookup"
    await pool.close_all()


async def test_unreachable_host_is_classified() -> None:
    pool = HostPool()
    conn = await pool.ensure("nowhere", ConnectOptions(uri="qemu+tcp://127.0.0.1:1/system"))
    with pytest.raises(AppError) as info:
        await conn.call("probe", lambda c: c.getHostname())
    assert info.value.code == ErrorCode.HOST_UNREACHABLE
    await pool.close_all()


async def test_slow_calls_time_out_with_a_code() -> None:
    pool = HostPool()
    conn = await pool.ensure("slow", ConnectOptions(uri="test:///default", call_timeout=0.2))
    with pytest.raises(AppError) as info:
        await conn.call("hang", lambda c: time.sleep(1))
    assert info.value.code == ErrorCode.LIBVIRT_TIMEOUT
    await pool.close_all()


async def test_changed_options_replace_the_connection() -> None:
    pool = HostPool()
    first = await pool.ensure("h", ConnectOptions(uri="test:///default"))
    assert await pool.ensure("h", ConnectOptions(uri="test:///default")) is first
    second = await pool.ensure("h", ConnectOptions(uri="test:///default", max_concurrent_calls=1))
    assert second is not first
    with pytest.raises(AppError):
        await first.call("after-close", lambda c: c.getHostname())
    await pool.close_all()


async def test_a_deleted_host_is_not_reconnected_until_it_exists_again() -> None:
    """A reconcile that read the LibvirtHost before its deletion must not reopen a connection that no
    daemon of that host would ever close."""
    pool = HostPool()
    options = ConnectOptions(uri="test:///default")
    conn = await pool.ensure("gone", options)
    assert await conn.call("hostname", lambda c: c.getHostname())
    await pool.remove("gone", deleted=True)
    assert conn.closed and pool.get("gone") is None
    with pytest.raises(AppError) as info:
        await pool.ensure("gone", options)
    assert info.value.code is ErrorCode.HOST_NOT_FOUND and "was deleted" in info.value.message
    assert pool.get("gone") is None and pool.names() == []
    await pool.remove("other")  # not a deletion (e.g. closing): no tombstone
    assert (await pool.ensure("other", options)) is not None
    pool.exists("gone")  # a LibvirtHost of that name again
    again = await pool.ensure("gone", options)
    assert again is not conn and await again.call("hostname", lambda c: c.getHostname())
    await pool.close_all()

"""The connection pool under contention and change (libvirt's test driver, in-process): timeouts
count the call, not the wait for a slot; concurrent callers share one connection and nothing leaks;
a replaced connection is not closed under a running call; the in-flight gauge and call durations
show calls, not queueing; callers of a hung host share one bounded connect attempt.
(time.sleep inside a call stands in for a slow libvirt call.)"""

from __future__ import annotations

import asyncio
import glob
import os
import socket
import tempfile
import threading
import time

import pytest
from prometheus_client import REGISTRY

from libvirt_operator.adapters.libvirt import ConnectOptions, HostPool
from libvirt_operator.core.errors import AppError, ErrorCode


def _cred_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "lvop-cred-*")))


async def test_a_call_timeout_counts_the_call_not_the_wait_for_a_slot() -> None:
    pool = HostPool()
    conn = await pool.ensure("queue", ConnectOptions(uri="test:///default", max_concurrent_calls=1))

    def slow(c):
        time.sleep(1.0)
        return c.getHostname()

    long_call = asyncio.create_task(conn.call("slow", slow, timeout=5))
    await asyncio.sleep(0.1)
    # waits ~0.9 s for the only slot, then runs in microseconds: well within its 0.5 s
    hostname = await conn.call("quick", lambda c: c.getHostname(), timeout=0.5)
    assert hostname and await long_call
    await pool.close_all()


async def test_concurrent_callers_share_one_connection_and_leak_no_key_dir() -> None:
    before = _cred_dirs()
    pool = HostPool()
    creds = {"ssh-privatekey": b"not a key", "known_hosts": b""}
    first = await pool.ensure("race", ConnectOptions(uri="test:///default", credentials=creds))
    await first.call("probe", lambda c: c.getHostname())
    changed = ConnectOptions(uri="test:///default", credentials=creds, max_concurrent_calls=2)

    async def caller():
        conn = await pool.ensure("race", changed)
        await conn.call("probe", lambda c: c.getHostname())
        return conn

    conns = await asyncio.gather(*(caller() for _ in range(6)))
    assert len({id(c) for c in conns}) == 1, "concurrent callers got different connections to one host"
    assert pool.get("race") is conns[0]
    await pool.close_all()
    deadline = time.monotonic() + 3
    while _cred_dirs() - before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # connections close in a worker thread
    assert _cred_dirs() - before == set(), "a connection's key directory outlived the pool"


async def test_a_replaced_connection_is_not_closed_under_a_running_call() -> None:
    pool = HostPool()
    conn = await pool.ensure("swap", ConnectOptions(uri="test:///default", max_concurrent_calls=4))

    def slow(c):
        time.sleep(0.5)
        return c.getHostname()  # still on the old connection

    running = asyncio.create_task(conn.call("slow", slow))
    await asyncio.sleep(0.1)
    new = await pool.ensure("swap", ConnectOptions(uri="test:///default", max_concurrent_calls=2))
    assert new is not conn
    assert await running, "the running call failed: its connection was closed under it"
    assert await new.call("probe", lambda c: c.getHostname())
    await pool.close_all()


async def test_in_flight_gauge_and_durations_show_the_call_not_the_queue() -> None:
    pool = HostPool()
    conn = await pool.ensure("gauge", ConnectOptions(uri="test:///default", max_concurrent_calls=1))

    def sample(name: str, op: str) -> float:
        return REGISTRY.get_sample_value(name, {"host": "gauge", "operation": op}) or 0.0

    started, release = threading.Event(), threading.Event()

    def slow(c):  # holds the only slot until the test has looked (no timing window to lose under load)
        started.set()
        release.wait(10)
        return c.getHostname()

    first = asyncio.create_task(conn.call("first", slow))
    for _ in range(200):
        if started.is_set():
            break
        await asyncio.sleep(0.05)
    queued = asyncio.create_task(conn.call("queued", lambda c: c.getHostname()))
    await asyncio.sleep(0.3)
    assert sample("libvirt_operator_libvirt_calls_in_flight", "first") == 1
    assert sample("libvirt_operator_libvirt_calls_in_flight", "queued") == 0  # waiting, not running
    await asyncio.sleep(0.7)
    release.set()
    await asyncio.gather(first, queued)
    assert sample("libvirt_operator_libvirt_calls_in_flight", "first") == 0
    assert sample("libvirt_operator_libvirt_call_duration_seconds_sum", "first") >= 1.0
    # it waited ~1 s for the slot; its duration is the call alone
    assert sample("libvirt_operator_libvirt_call_duration_seconds_sum", "queued") < 0.5
    await pool.close_all()


async def test_streams_have_their_own_slots() -> None:
    pool = HostPool()
    conn = await pool.ensure("streams", ConnectOptions(uri="test:///default", max_concurrent_calls=1,
                                                       max_concurrent_streams=2))

    def upload(c):  # a long upload occupies its thread (the real one: tests/integration)
        time.sleep(1.0)
        return c.getHostname()

    uploads = [asyncio.create_task(conn.call("volume.upload", upload, stream=True)) for _ in range(3)]
    await asyncio.sleep(0.1)
    started = time.monotonic()
    assert await conn.call("list_domains", lambda c: c.listAllDomains(0), timeout=0.5) is not None
    assert time.monotonic() - started < 0.3, "a call waited for uploads"
    await asyncio.gather(*uploads)
    await pool.close_all()


async def test_callers_of_a_hung_host_share_one_bounded_connect_then_fail_at_once() -> None:
    # a host that accepts TCP and never answers: libvirt's open blocks forever on it
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    pool = HostPool()
    try:
        conn = await pool.ensure("hung", ConnectOptions(uri=f"qemu+tcp://127.0.0.1:{port}/system",
                                                        connect_timeout=2, call_timeout=30))
        started = time.monotonic()
        results = await asyncio.gather(*(conn.call("probe", lambda c: c.getHostname()) for _ in range(4)),
                                       return_exceptions=True)
        took = time.monotonic() - started
        assert all(isinstance(r, AppError) and r.code == ErrorCode.HOST_UNREACHABLE for r in results), results
        assert took < 3.5, f"callers waited {took:.1f}s (one after the other behind the hung connect?)"
        message = results[0].message
        assert f"qemu+tcp://127.0.0.1:{port}/system hung" in message and "step: connect" in message
        # the attempt is still stuck in libvirt: later callers do not queue behind it
        started = time.monotonic()
        try:
            await conn.call("list_domains", lambda c: c.listAllDomains(0))
        except AppError as err:
            assert err.code == ErrorCode.HOST_UNREACHABLE and "hung" in err.message
        assert time.monotonic() - started < 0.5
        assert silent.accept()  # one connection only: a single connect attempt for all of them
        silent.settimeout(0.2)
        with pytest.raises(OSError):
            silent.accept()
    finally:
        await pool.close_all()
        silent.close()


async def test_calls_beyond_one_connections_share_spread_over_more_connections() -> None:
    """libvirtd serves at most max_client_requests (5) requests of one connection at once: with more call
    slots than CALLS_PER_CONNECTION, calls run on extra connections (opened when the others are full), never
    more than the slots need; the probe and event subscriptions stay on the main connection; closing the
    host closes them all and leaves no key directory."""
    from libvirt_operator.adapters.libvirt.connection import CALLS_PER_CONNECTION

    before = _cred_dirs()
    pool = HostPool()
    creds = {"ssh-privatekey": b"not a key", "known_hosts": b""}
    conn = await pool.ensure("spread", ConnectOptions(uri="test:///default", max_concurrent_calls=12, credentials=creds))
    main = await conn.call("probe", lambda c: c)
    running: dict[int, int] = {}
    peak: dict[int, int] = {}
    import threading
    lock = threading.Lock()

    def slow(c):
        with lock:
            running[id(c)] = running.get(id(c), 0) + 1
            peak[id(c)] = max(peak.get(id(c), 0), running[id(c)])
        time.sleep(0.3)
        with lock:
            running[id(c)] -= 1
        return id(c)

    await asyncio.gather(*(conn.call("slow", slow) for _ in range(12)))  # opens the extras
    deadline = time.monotonic() + 5
    while len(conn._extras) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(conn._extras) == 2, "12 slots at 4 calls per connection: the main one and 2 extras"
    peak.clear()
    used = await asyncio.gather(*(conn.call("slow", slow) for _ in range(12)))
    assert len(set(used)) == 3 and max(peak.values()) <= CALLS_PER_CONNECTION, peak
    # pinned to the main connection, however busy it is
    for op in ("probe", "subscribe", "open-console"):
        assert await conn.call(op, lambda c: c) is main
    assert len(conn._extras) == 2  # never more than the slots need
    await pool.close_all()
    deadline = time.monotonic() + 3
    while _cred_dirs() - before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not _cred_dirs() - before, "an extra connection's key directory was left behind"


async def test_a_test_driver_file_host_keeps_one_connection_so_every_call_sees_the_same_domains(tmp_path) -> None:
    """libvirt's test driver gives each connection to a file URI its own world: a host on such a URI must
    not spread its calls (a domain defined over one connection was 'not found' over another)."""
    from libvirt_operator.adapters.libvirt.connection import shares_state_across_connections

    assert shares_state_across_connections("qemu+ssh://root@kvm-1/system")
    assert shares_state_across_connections("qemu:///system") and shares_state_across_connections("test:///default")
    assert not shares_state_across_connections(f"test://{tmp_path}/host.xml")

    node = tmp_path / "host.xml"
    node.write_text("<node><cpu><nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>1</threads></cpu>"
                    "<memory>8388608</memory></node>")
    pool = HostPool()
    conn = await pool.ensure("file", ConnectOptions(uri=f"test://{node}", max_concurrent_calls=16))
    try:
        def define(i: int):
            def run(c):
                c.defineXML(f"<domain type='test'><name>d{i}</name><memory>65536</memory>"
                            "<os><type>hvm</type></os></domain>")
                time.sleep(0.05)
                return sorted(c.listDefinedDomains())
            return run
        await asyncio.gather(*(conn.call("define", define(i)) for i in range(24)))
        seen = await asyncio.gather(*(conn.call("list", lambda c: sorted(c.listDefinedDomains())) for _ in range(16)))
        assert all(len(s) == 24 for s in seen), [len(s) for s in seen]
        assert conn._extras == []
    finally:
        await pool.close_all()

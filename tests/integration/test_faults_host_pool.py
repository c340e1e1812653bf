"""Connection faults on a real libvirtd:
- a daemon restart under running calls: every call that finds its connection gone is retried once
  on ONE new connection; no call fails because another caller closed the connection it was using
  (VIR_ERR_INVALID_CONN);
- a network partition (a proxy that stops forwarding): keepalive declares the connection lost, the
  call that was waiting ends instead of hanging, and the host's lost hooks hear why."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
import time

import pytest

from libvirt_operator.adapters.libvirt import ConnectOptions, HostPool
from libvirt_operator.adapters.libvirt.events import ensure_event_thread
from libvirt_operator.core.errors import AppError, ErrorCode


async def test_calls_running_across_a_daemon_restart_all_succeed(libvirtd_factory) -> None:
    ensure_event_thread()
    daemon = libvirtd_factory("restart")
    pool = HostPool()
    host = await pool.ensure("restart", ConnectOptions(uri=daemon.uri, max_concurrent_calls=6, call_timeout=60))
    assert await host.call("probe", lambda c: c.getHostname())
    restarted = threading.Event()

    def after_restart(c):
        restarted.wait(60)  # the call is under way on the old connection while the daemon restarts
        return c.getHostname()

    calls = [asyncio.create_task(host.call(f"call{i}", after_restart)) for i in range(6)]
    await asyncio.sleep(0.3)
    await asyncio.to_thread(daemon.stop)
    await asyncio.to_thread(daemon.start)
    restarted.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    await pool.close_all()
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == [], f"{len(failures)} of 6 calls failed across the restart: {failures[:2]}"


class FreezableProxy:
    """A TCP proxy on loopback in front of a daemon; `freeze()` stops it forwarding anything, as a
    network partition would (the sockets stay open, nothing answers)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.frozen = threading.Event()
        self.closed = threading.Event()
        self._socks: list[socket.socket] = [self.sock]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while not self.closed.is_set():
            if self.frozen.is_set():
                time.sleep(0.1)  # neither read nor forward: the bytes stay where they are
                continue
            ready, _, _ = select.select([src], [], [], 0.1)
            if not ready or self.frozen.is_set():
                continue
            try:
                data = src.recv(65536)
                if not data:
                    return
                dst.sendall(data)
            except OSError:
                return

    def freeze(self) -> None:
        self.frozen.set()

    def close(self) -> None:
        self.closed.set()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


async def test_a_partitioned_host_is_detected_by_keepalive_and_its_calls_end(libvirtd) -> None:
    ensure_event_thread()  # keepalives need libvirt's event loop (the operator starts it at start-up)
    proxy = FreezableProxy(libvirtd.port)
    pool = HostPool()
    try:
        host = await pool.ensure("partitioned", ConnectOptions(uri=f"qemu+tcp://127.0.0.1:{proxy.port}/system",
                                                               call_timeout=120, connect_timeout=5))
        lost: list[tuple[float, str]] = []
        host.on_lost.append(lambda reason: lost.append((time.monotonic(), reason)))
        assert await host.call("probe", lambda c: c.getHostname())
        proxy.freeze()
        frozen = time.monotonic()
        with pytest.raises(AppError) as info:
            await host.call("probe", lambda c: c.getHostname())  # would block forever without keepalive
        took = time.monotonic() - frozen
        # keepalive: 5 s interval, 3 unanswered → lost after ~15-20 s; the one reopen attempt then
        # hangs behind the partition too and is given up after connect_timeout (5 s)
        assert took < 35, f"the call on a partitioned host ended only after {took:.0f}s"
        assert lost and "keepalive" in lost[0][1], lost
        assert info.value.code == ErrorCode.HOST_UNREACHABLE
        assert f"qemu+tcp://127.0.0.1:{proxy.port}/system hung" in info.value.message
    finally:
        await pool.close_all()
        proxy.close()

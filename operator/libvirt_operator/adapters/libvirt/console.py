"""A domain's serial console as an async byte pipe.

The console is a non-blocking libvirt stream driven by libvirt's own event loop thread (events.py):
its event callback, every recv/send and the final abort run on that one thread, so no libvirt call of
a console ever blocks the operator's loop or runs concurrently with another on the same stream. Only
opening it goes through the host's call() (a short call, bounded like any other). Received bytes are
handed to the caller's loop; a bounded queue stops reading from libvirt (the guest's output waits in
libvirt's buffers) while the client is slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import libvirt

from ...core.errors import AppError, ErrorCode
from .connection import HostConnection
from .events import ensure_event_thread

_CHUNK = 64 * 1024
_QUEUE_CHUNKS = 64  # received chunks waiting for the client before libvirt is no longer read
_READ = libvirt.VIR_STREAM_EVENT_READABLE
_ENDED = libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP

MAX_OPEN_CONSOLES = 32  # per operator process: each holds a libvirt stream on a host connection
_open_slots = threading.BoundedSemaphore(MAX_OPEN_CONSOLES)


class Console:
    """An open console. `read()` returns b"" once the console ended (guest stopped, another session
    took it with force, the connection was lost); `close()` ends it from our side."""

    def __init__(self, stream: libvirt.virStream, loop: asyncio.AbstractEventLoop) -> None:
        self._stream = stream
        self._loop = loop                         # the caller's
        self._lv_loop = ensure_event_thread()     # libvirt's
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()  # bounded by pausing the reads
        self._closed = False
        self._watching = False
        self._paused = False

    # -- libvirt's thread -----------------------------------------------------------------
    def _start(self) -> None:
        try:
            self._stream.eventAddCallback(_READ | _ENDED, self._on_event, None)
            self._watching = True
        except libvirt.libvirtError:
            self._finish()

    def _on_event(self, _stream: libvirt.virStream, events: int, _opaque: Any) -> None:
        if self._closed:
            return
        if events & _READ:
            self._drain()
        elif events & _ENDED:
            self._finish()

    def _drain(self) -> None:
        try:
            data = self._stream.recv(_CHUNK)
        except libvirt.libvirtError:
            data = b""
        if data == -2:  # nothing yet (non-blocking)
            return
        if not data:
            self._finish()
            return
        self._loop.call_soon_threadsafe(self._put, data)

    def _put(self, data: bytes) -> None:  # the caller's loop
        self._queue.put_nowait(data)
        if self._queue.qsize() >= _QUEUE_CHUNKS and not self._paused:
            self._paused = True
            self._lv_loop.call_soon_threadsafe(self._watch, _ENDED)

    def _watch(self, events: int) -> None:
        if self._watching and not self._closed:
            with contextlib.suppress(libvirt.libvirtError):
                self._stream.eventUpdateCallback(events)

    def _send(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            sent = 0
            while sent < len(data):
                n = self._stream.send(data[sent:])
                if n == -2:  # libvirt's send buffer is full: drop the rest (keystrokes, not a transfer)
                    break
                sent += n
        except libvirt.libvirtError:
            self._finish()

    def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watching:
            with contextlib.suppress(libvirt.libvirtError):
                self._stream.eventRemoveCallback()
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.abort()
        _open_slots.release()
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody reads
            self._loop.call_soon_threadsafe(self._end)

    def _end(self) -> None:  # the caller's loop
        self._queue.put_nowait(b"")

    # -- the caller's loop ----------------------------------------------------------------
    async def read(self) -> bytes:
        data = await self._queue.get()
        if self._paused and self._queue.qsize() < _QUEUE_CHUNKS // 2 and not self._closed:
            self._paused = False
            self._lv_loop.call_soon_threadsafe(self._watch, _READ | _ENDED)
        if not data:
            self._queue.put_nowait(b"")  # stays ended for further reads
        return data

    def write(self, data: bytes) -> None:
        if data:
            self._lv_loop.call_soon_threadsafe(self._send, bytes(data))

    def close(self) -> None:
        self._lv_loop.call_soon_threadsafe(self._finish)


async def open_console(host: HostConnection, domain_uuid: str) -> Console:
    """Open the domain's first console (with force: a stale session elsewhere is disconnected, as
    `virsh console --force` does). AppError when the host cannot (the test driver has no consoles),
    the domain is missing or not running, or MAX_OPEN_CONSOLES are open."""
    if not _open_slots.acquire(blocking=False):
        raise AppError(ErrorCode.LIBVIRT_TIMEOUT,
                       f"{MAX_OPEN_CONSOLES} consoles are open on this operator; try again later",
                       {"host": host.name, "operation": "open-console"})
    loop = asyncio.get_running_loop()

    def open_stream(conn: libvirt.virConnect) -> libvirt.virStream:
        if conn.getType().upper() == "TEST":  # it would fail only after the lookup, with a vaguer message
            raise AppError(ErrorCode.HYPERVISOR_UNSUPPORTED, "libvirt's test driver does not support consoles",
                           {"host": host.name, "operation": "open-console"})
        dom = conn.lookupByUUIDString(domain_uuid)
        stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        try:
            dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        except libvirt.libvirtError:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise
        return stream

    try:
        stream = await host.call("open-console", open_stream)
    except BaseException:
        _open_slots.release()
        raise
    console = Console(stream, loop)
    console._lv_loop.call_soon_threadsafe(console._start)
    return console

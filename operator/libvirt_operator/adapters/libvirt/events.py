"""libvirt's event loop, run by libvirtaio on a dedicated, process-wide thread.

libvirt accepts one event loop implementation per process, for the life of the process, and it must
be registered before connections are opened for keepalives and domain events to work. Binding it to
kopf's loop would break as soon as that loop closes (an operator restart, the embedded default's
teardown). So libvirt gets its own loop on its own thread; callbacks are handed to the operator's
loop with `deliver`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import libvirtaio

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
TICK_SECONDS = 0.1


def ensure_event_thread() -> asyncio.AbstractEventLoop:
    """Start the libvirt event thread once per process; returns its loop."""
    global _loop
    with _lock:
        if _loop is not None:
            return _loop
        ready = threading.Event()
        loop = asyncio.new_event_loop()

        def tick() -> None:
            # libvirtaio schedules timers from whichever thread calls libvirt, which does not wake a
            # loop running on another thread; the test driver dispatches domain events from such a
            # timer. A cheap periodic wake-up bounds that delay to TICK_SECONDS.
            loop.call_later(TICK_SECONDS, tick)

        def run() -> None:
            asyncio.set_event_loop(loop)
            libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
            loop.call_soon(ready.set)
            loop.call_soon(tick)
            loop.run_forever()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        ready.wait(10)
        _loop = loop
        return loop


def deliver(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
    """Hand a libvirt callback's work to the operator's loop (no-op once that loop is closed)."""
    if not loop.is_closed():
        loop.call_soon_threadsafe(callback, *args)

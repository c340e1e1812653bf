"""Daemon threads that run libvirt calls, reused from call to call.

`threading.Thread.start()` blocks its caller until the new thread runs: started from the event loop
for every call, that cost milliseconds of loop time per call under load. A thread whose call finished
waits here for the next one instead, and ends after `IDLE_SECONDS` without one. A call that hangs keeps
its thread and never delays another: a call that finds no idle thread starts one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

IDLE_SECONDS = 30.0
_Job = tuple[str, Callable[..., Any], tuple[Any, ...]]


class CallThreads:
    def __init__(self, idle_seconds: float = IDLE_SECONDS) -> None:
        self._idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting in _next() that no submit has claimed
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()  # one per claimed thread
        self.started = 0

    def submit(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) in a daemon thread named `name`, now. fn reports its own errors."""
        job: _Job = (name, fn, args)
        with self._lock:
            claimed = self._idle > 0
            if claimed:
                self._idle -= 1
            else:
                self.started += 1
        if claimed:
            self._jobs.put(job)
        else:
            threading.Thread(target=self._work, args=(job,), daemon=True, name=name).start()

    def idle(self) -> int:
        with self._lock:
            return self._idle

    def _work(self, job: _Job | None) -> None:
        while job is not None:
            name, fn, args = job
            threading.current_thread().name = name
            try:
                fn(*args)
            except BaseException:  # noqa: BLE001, S110  (a job reports its own errors; the thread lives on)
                pass
            job = fn = args = None  # hold no references while idle
            with self._lock:
                self._idle += 1
            job = self._next()

    def _next(self) -> _Job | None:
        while True:
            try:
                return self._jobs.get(timeout=self._idle_seconds)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # unclaimed threads are alike: one of them leaves
                        self._idle -= 1
                        return None
                # every waiting thread is claimed: a job for this one is in the queue

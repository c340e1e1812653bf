"""Requeue with per-key exponential backoff, without holding a kopf worker.

kopf waits out a TemporaryError's delay inside the object's worker (a slot of
settings.queueing.worker_limit), so objects parked on something missing would hold every slot and
starve new objects. Instead a handler records the status, returns, and puts the key here; ONE loop
(a heap of (due time, key), no task per key) re-runs the reconcile for the keys that are due, with
bounded concurrency. Watch events that may unblock a key (a host, an ISOImage, a namespace changed)
make it due at once (`wake`), without resetting its backoff.

Metrics (client-go's `workqueue_*`, label `name`): depth = keys due and not yet picked up (keys
waiting out a backoff are "delayed", as in client-go), an add = a key put in the queue, a retry = a
failure that re-schedules it, queue duration = from due to picked up, work duration = `work(key)`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable, Iterable

from ..core.logs import get_logger
from ..core.workqueue import QueueMetrics

log = get_logger(__name__)


class Requeue:
    """Keys due at some monotonic time; each failure doubles the key's next delay (base … cap)."""

    def __init__(self, base: float, cap: float, name: str = "requeue") -> None:
        self.base, self.cap = base, cap
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, float] = {}         # key → due time (heap entries with another time are stale)
        self._attempts: dict[str, int] = {}      # key → failures in a row (the backoff exponent)
        self._seq = itertools.count()
        self._changed: asyncio.Event | None = None
        self._inflight: set[str] = set()
        self._rewake: set[str] = set()
        self._waited: dict[str, float] = {}      # popped key → seconds it waited after being due
        self.metrics = QueueMetrics(name, self.ready_count)

    # --- bookkeeping (sync, O(log n)) ---

    def __contains__(self, key: str) -> bool:
        return key in self._due

    def __len__(self) -> int:
        return len(self._due)

    def ready_count(self) -> int:
        """Keys due now and not picked up yet (the work-queue depth)."""
        now = time.monotonic()
        return sum(1 for due in list(self._due.values()) if due <= now)

    def attempts(self, key: str) -> int:
        return self._attempts.get(key, 0)

    def delay_for(self, attempt: int) -> float:
        return min(self.cap, self.base * (2 ** max(0, attempt - 1)))

    def failed(self, key: str, at_most: float | None = None) -> float:
        """One more failure: schedule the key after its backoff delay (capped for this key by
        `at_most`); returns the delay."""
        attempt = self._attempts[key] = self._attempts.get(key, 0) + 1
        self.metrics.retried()
        delay = self.delay_for(attempt)
        if at_most is not None:
            delay = min(delay, at_most)
        self.schedule(key, delay)
        return delay

    def schedule(self, key: str, delay: float) -> None:
        if key in self._rewake:  # woken while its reconcile ran: what it waited for may have come since
            self._rewake.discard(key)
            delay = 0.0
        due = time.monotonic() + max(0.0, delay)
        if key not in self._due:
            self.metrics.added()
        self._due[key] = due
        heapq.heappush(self._heap, (due, next(self._seq), key))
        if self._heap[0][2] == key and self._changed is not None:
            self._changed.set()  # the loop may be sleeping until a later time

    def wake(self, keys: Iterable[str]) -> None:
        """Due now, keeping the backoff exponent (a watch event: what it waited for may be there)."""
        now = time.monotonic()
        woke = False
        for key in keys:
            if key in self._inflight:
                self._rewake.add(key)
            elif key in self._due and self._due[key] > now:
                self._due[key] = now
                heapq.heappush(self._heap, (now, next(self._seq), key))
                woke = True
        if woke and self._changed is not None:
            self._changed.set()

    def done(self, key: str) -> None:
        """Healthy (or gone): no requeue, backoff reset."""
        self._due.pop(key, None)
        self._attempts.pop(key, None)
        self._rewake.discard(key)

    def reset(self, key: str) -> None:
        """The spec changed: the next failure starts at the base delay again."""
        self._attempts.pop(key, None)

    def pop_due(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        out = []
        while self._heap and self._heap[0][0] <= now:
            due, _, key = heapq.heappop(self._heap)
            if self._due.get(key) == due:
                del self._due[key]
                out.append(key)
                self._waited[key] = now - due
        return out

    def next_due(self) -> float | None:
        while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
            heapq.heappop(self._heap)  # stale entry
        return self._heap[0][0] if self._heap else None

    # --- the loop ---

    async def run(self, work: Callable[[str], Awaitable[None]], *, concurrency: int = 8,
                  idle: float = 60.0) -> None:
        """Forever: run `work(key)` for due keys, at most `concurrency` at once."""
        self._changed = asyncio.Event()
        limit = asyncio.Semaphore(concurrency)
        running: set[asyncio.Task[None]] = set()

        async def one(key: str) -> None:
            self._inflight.add(key)
            token = self.metrics.started(self._waited.pop(key, 0.0))
            try:
                await work(key)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001  (the loop must survive anything)
                log.exception("requeued reconcile failed", key=key)
            finally:
                self.metrics.finished(token)
                self._inflight.discard(key)
                self._rewake.discard(key)
                limit.release()

        try:
            while True:
                self._changed.clear()
                for key in self.pop_due():
                    await limit.acquire()
                    task = asyncio.create_task(one(key))
                    running.add(task)
                    task.add_done_callback(running.discard)
                due = self.next_due()
                timeout = idle if due is None else max(0.0, due - time.monotonic())
                if timeout > 0:
                    try:
                        await asyncio.wait_for(self._changed.wait(), timeout=timeout)
                    except (asyncio.TimeoutError, TimeoutError):
                        pass
        finally:
            for task in running:
                task.cancel()

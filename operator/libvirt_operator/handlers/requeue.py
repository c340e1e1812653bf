"""A keyed work queue: deduplicated, one worker per key at a time, per-key exponential backoff,
requeue-after, bounded global concurrency (client-go's rate-limited work queue, on asyncio).

ONE loop (a heap of (due time, key), no task per key) runs `work(key)` for the keys that are due.
Two ways in, kept apart on purpose:
* `add(key)`: a trigger (a watch event, a host round, a finished migration). It never postpones a key
  and is never lost: a key added while its work runs is run once more right after (client-go's
  "dirty while processing").
* `schedule` / `failed` / `done`: the result of the key's own work (requeue after, back off, healthy).
Watch events that may unblock a waiting key (a host, an ISOImage, a namespace changed) make it due
at once (`wake`), without resetting its backoff.

Metrics (client-go's `workqueue_*`, label `name`): depth = keys due and not yet picked up (keys
waiting out a backoff are "delayed", as in client-go), an add = a key put in the queue, a retry = a
failure that re-schedules it, queue duration = from due to picked up, work duration = `work(key)`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
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
        self._again: dict[str, float] = {}       # running key → when a trigger asked for it again
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

    def restore(self, key: str, attempts: int) -> None:
        """Failures in a row counted before this process knew the key (a status written before a
        restart): the next failure backs off from there."""
        if attempts > 0:
            self._attempts[key] = attempts

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

    def add(self, key: str, delay: float = 0.0) -> None:
        """A trigger: the key is due within `delay` (an earlier due time stays). While its work runs,
        it is remembered and due again once that work ends, whatever the work decides."""
        due = time.monotonic() + max(0.0, delay)
        if key in self._inflight:
            self._again[key] = min(due, self._again.get(key, due))
        else:
            self._put_by(key, due)

    def schedule(self, key: str, delay: float) -> None:
        """The key's own work decided when it runs next (replaces an earlier decision)."""
        self._put(key, time.monotonic() + max(0.0, delay))

    def _put_by(self, key: str, due: float) -> None:
        """Due by `due`: an earlier due time stays."""
        if not (key in self._due and self._due[key] <= due):
            self._put(key, due)

    def _put(self, key: str, due: float) -> None:
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
            if key in self._inflight:  # what it waits for may have come after its work looked
                self._again[key] = now
            elif key in self._due and self._due[key] > now:
                self._due[key] = now
                heapq.heappush(self._heap, (now, next(self._seq), key))
                woke = True
        if woke and self._changed is not None:
            self._changed.set()

    def done(self, key: str) -> None:
        """Healthy (or gone): no requeue, backoff reset. A trigger that came while the key's work ran
        still runs it again."""
        self._due.pop(key, None)
        self._attempts.pop(key, None)

    def forget(self, key: str) -> None:
        """The object is gone: nothing of the key stays."""
        self.done(key)
        self._again.pop(key, None)

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
            token = self.metrics.started(self._waited.pop(key, 0.0))
            try:
                await work(key)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001  (the loop must survive anything; the key is not dropped)
                log.exception("reconcile crashed", key=key)
                self.failed(key)
            finally:
                self.metrics.finished(token)
                self._inflight.discard(key)
                again = self._again.pop(key, None)
                if again is not None:
                    self._put_by(key, again)
                limit.release()

        try:
            while True:
                self._changed.clear()
                for key in self.pop_due():
                    if key in self._inflight:  # one worker per key: it runs again when this one ends
                        self._again[key] = min(time.monotonic(), self._again.get(key, math.inf))
                        continue
                    await limit.acquire()
                    self._inflight.add(key)
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

"""client-go's work-queue metrics for the operator's own queues (the requeue heap of handlers.requeue,
the VM resync set of handlers.vm_state).

A queue registers a `QueueMetrics` with its name and a depth function; counters and histograms are
updated as items move (`added`, `started`, `finished`, `retried`), and the gauges
(`workqueue_depth`, `workqueue_unfinished_work_seconds`,
`workqueue_longest_running_processor_seconds`) are computed at scrape time by one collector, summed
over the live queues of a name (several operators may run in one process, e.g. in tests).
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

from .metrics import WORKQUEUE_ADDS, WORKQUEUE_QUEUE_SECONDS, WORKQUEUE_RETRIES, WORKQUEUE_WORK_SECONDS


class QueueMetrics:
    def __init__(self, name: str, depth: Callable[[], int]) -> None:
        self.name = name
        self._depth = depth
        self._running: dict[int, float] = {}  # token → monotonic start
        self._tokens = itertools.count()
        self._adds = WORKQUEUE_ADDS.labels(name)
        self._retries = WORKQUEUE_RETRIES.labels(name)
        self._queued = WORKQUEUE_QUEUE_SECONDS.labels(name)
        self._work = WORKQUEUE_WORK_SECONDS.labels(name)
        _LIVE.add(self)

    def added(self, count: int = 1) -> None:
        if count:
            self._adds.inc(count)

    def retried(self) -> None:
        self._retries.inc()

    def started(self, waited: float) -> int:
        """An item leaves the queue after `waited` seconds (from due to picked up); returns a token."""
        self._queued.observe(max(0.0, waited))
        token = next(self._tokens)
        self._running[token] = time.monotonic()
        return token

    def finished(self, token: int) -> None:
        started = self._running.pop(token, None)
        if started is not None:
            self._work.observe(time.monotonic() - started)

    def worked(self, seconds: float) -> None:
        """A unit of work measured by the caller (no start/finish pair)."""
        self._work.observe(max(0.0, seconds))

    def snapshot(self, now: float) -> tuple[int, float, float]:
        """(depth, unfinished work seconds, longest running processor seconds)."""
        try:
            depth = int(self._depth())
        except Exception:  # noqa: BLE001  (a scrape must never fail on a queue mid-change)
            depth = 0
        running = [now - t for t in list(self._running.values())]
        return depth, sum(running), max(running, default=0.0)


_LIVE: weakref.WeakSet[QueueMetrics] = weakref.WeakSet()


class _QueueCollector(Collector):
    def collect(self) -> Iterator[Any]:
        now = time.monotonic()
        totals: dict[str, list[float]] = {}
        for queue in list(_LIVE):
            depth, unfinished, longest = queue.snapshot(now)
            t = totals.setdefault(queue.name, [0, 0.0, 0.0])
            t[0] += depth
            t[1] += unfinished
            t[2] = max(t[2], longest)
        depth_f = GaugeMetricFamily("workqueue_depth", "Current depth of workqueue", labels=["name"])
        unfinished_f = GaugeMetricFamily(
            "workqueue_unfinished_work_seconds",
            "How many seconds of work has been done that is in progress and hasn't been observed by "
            "work_duration. Large values indicate stuck threads.", labels=["name"])
        longest_f = GaugeMetricFamily(
            "workqueue_longest_running_processor_seconds",
            "How many seconds has the longest running processor for workqueue been running.", labels=["name"])
        for name, (depth, unfinished, longest) in sorted(totals.items()):
            depth_f.add_metric([name], depth)
            unfinished_f.add_metric([name], unfinished)
            longest_f.add_metric([name], longest)
        yield depth_f
        yield unfinished_f
        yield longest_f

    def describe(self) -> Iterator[Any]:
        return iter(())  # computed at scrape time; nothing to check at registration


_registered = threading.Lock()
_collector: _QueueCollector | None = None


def register_collector() -> None:
    global _collector
    with _registered:
        if _collector is None:
            _collector = _QueueCollector()
            REGISTRY.register(_collector)


register_collector()

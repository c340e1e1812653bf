"""Metric semantics a dashboard or an alert relies on (controller-runtime's): errors are counted
whatever kopf calls them, idle timer ticks are not reconciles, queues report depth and latency,
a deleted host's series disappear, and the metrics port answers only /metrics."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import kopf
import pytest
from prometheus_client import REGISTRY

from libvirt_operator.cli.metrics_server import serve_metrics
from libvirt_operator.core import metrics
from libvirt_operator.handlers.instrument import ended_with, reconciler, working
from libvirt_operator.handlers.requeue import Requeue


def value(metric: str, /, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


def counts(controller: str) -> dict[str, float]:
    return {r: value("controller_runtime_reconcile_total", controller=controller, result=r)
            for r in ("success", "error", "requeue_after")} | {
        "errors": value("controller_runtime_reconcile_errors_total", controller=controller),
        "observed": value("controller_runtime_reconcile_time_seconds_count", controller=controller)}


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before if after[k] != before[k]}


async def test_temporary_error_is_an_error_reconcile() -> None:
    @reconciler("t_temporary", "T")
    async def handler(**_: object) -> None:
        raise kopf.TemporaryError("host unreachable", delay=1)

    before = counts("t_temporary")
    with pytest.raises(kopf.TemporaryError):
        await handler(meta={"name": "a"})
    assert delta(before, counts("t_temporary")) == {"error": 1, "errors": 1, "observed": 1}


async def test_error_written_to_status_is_an_error_and_requeue_after_is_not() -> None:
    @reconciler("t_status", "T")
    async def handler(error: object, requeue: float | None, **_: object) -> None:
        ended_with(error, requeue)

    before = counts("t_status")
    await handler(error=RuntimeError("HOST_UNREACHABLE"), requeue=None)
    await handler(error=None, requeue=5.0)
    await handler(error=None, requeue=None)
    assert delta(before, counts("t_status")) == {"error": 1, "errors": 1, "requeue_after": 1, "success": 1,
                                                 "observed": 3}


async def test_idle_timer_ticks_are_not_reconciles() -> None:
    @reconciler("t_timer", "T", timer=True)
    async def tick(due: bool, fail: bool, **_: object) -> None:
        if not due:
            return
        working()
        ended_with(RuntimeError("x") if fail else None)

    before = counts("t_timer")
    for _ in range(50):
        await tick(due=False, fail=False)
    assert counts("t_timer") == before  # 50 ticks that found nothing due: no reconcile
    await tick(due=True, fail=True)
    await tick(due=True, fail=False)
    assert delta(before, counts("t_timer")) == {"error": 1, "errors": 1, "success": 1, "observed": 2}


async def test_requeue_heap_reports_workqueue_metrics() -> None:
    q = Requeue(30.0, 60.0, name="t_heap")  # delays far beyond any scheduling hiccup of a loaded CI
    adds, retries = value("workqueue_adds_total", name="t_heap"), value("workqueue_retries_total", name="t_heap")
    q.schedule("a", 0)
    q.schedule("b", 0)
    q.schedule("c", 60)  # waiting out a delay: not in the depth yet (client-go's delaying queue)
    q.failed("d")
    assert value("workqueue_adds_total", name="t_heap") - adds == 4
    assert value("workqueue_retries_total", name="t_heap") - retries == 1
    assert value("workqueue_depth", name="t_heap") == 2  # "c" and "d" wait out their delays
    q.wake(["d"])  # a watch event: "d" is due now, so it counts in the depth
    assert value("workqueue_depth", name="t_heap") == 3

    release = asyncio.Event()
    seen: list[str] = []

    async def work(key: str) -> None:
        seen.append(key)
        if key == "a":
            await release.wait()

    loop = asyncio.create_task(q.run(work, concurrency=4))
    try:
        for _ in range(100):
            if {"a", "b", "d"} <= set(seen):
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert value("workqueue_longest_running_processor_seconds", name="t_heap") >= 0.1  # "a" is stuck
        assert value("workqueue_unfinished_work_seconds", name="t_heap") >= 0.1
        assert value("workqueue_depth", name="t_heap") == 0
        release.set()
        await asyncio.sleep(0.05)
        assert value("workqueue_work_duration_seconds_count", name="t_heap") == 3
        assert value("workqueue_queue_duration_seconds_count", name="t_heap") == 3
        assert value("workqueue_longest_running_processor_seconds", name="t_heap") == 0
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop


def test_deleted_host_series_disappear() -> None:
    metrics.HOST_CONNECTED.labels("gone-host").set(1)
    metrics.LIBVIRT_CALL_SECONDS.labels("gone-host", "probe").observe(0.01)
    metrics.LIBVIRT_CALLS_IN_FLIGHT.labels("gone-host", "probe").set(0)
    metrics.HOST_CONNECTED.labels("kept-host").set(1)
    metrics.forget_host("gone-host")
    text = "\n".join(f"{s.name}{s.labels}" for m in REGISTRY.collect() for s in m.samples)
    assert "gone-host" not in text
    assert value("libvirt_operator_host_connected", host="kept-host") == 1


def test_metrics_port_answers_only_metrics() -> None:
    server = serve_metrics(0, "127.0.0.1")
    port = server.server_address[1]
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "controller_runtime_reconcile_total" in body
        assert "process_resident_memory_bytes" in body and "process_cpu_seconds_total" in body
        for path in ("/", "/healthz", "/metrics/extra"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)
            assert err.value.code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_known_series_exist_at_zero_from_the_start() -> None:
    """A counter that first appears at 1 is invisible to rate()/increase(): the first reconcile error
    after a restart would never fire an alert. The known label sets are created at 0 at startup."""
    from libvirt_operator.core.errors import ErrorCode
    from libvirt_operator.core.metrics import initialise_series

    initialise_series(("t_fresh_controller",))
    sample = REGISTRY.get_sample_value
    assert sample("controller_runtime_reconcile_errors_total", {"controller": "t_fresh_controller"}) == 0
    for result in ("success", "error", "requeue_after"):
        assert sample("controller_runtime_reconcile_total", {"controller": "t_fresh_controller", "result": result}) == 0
    for code in ErrorCode:
        assert sample("libvirt_operator_errors_total", {"kind": "VirtualMachine", "code": code.value}) is not None

"""handlers.requeue.Requeue: one loop, per-key exponential backoff, wake-ups, bounded concurrency."""

from __future__ import annotations

import asyncio
import time

from libvirt_operator.handlers.requeue import Requeue


def test_backoff_doubles_per_key_until_the_cap_and_resets() -> None:
    q = Requeue(base=2.0, cap=10.0)
    assert [q.failed("a") for _ in range(5)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert q.failed("b") == 2.0  # per key
    q.reset("a")
    assert q.failed("a") == 2.0
    q.done("a")
    assert "a" not in q and q.attempts("a") == 0 and "b" in q


def test_only_due_keys_pop_and_a_reschedule_replaces_the_old_time() -> None:
    q = Requeue(base=1.0, cap=60.0)
    q.schedule("a", 0)
    q.schedule("b", 30)
    q.schedule("c", 0)
    q.schedule("c", 30)  # the newer decision wins: not due now
    assert q.pop_due() == ["a"]
    assert q.pop_due() == []
    q.wake(["b", "zzz"])  # wakes scheduled keys only
    assert q.pop_due() == ["b"]
    assert len(q) == 1 and q.next_due() is not None


def test_the_loop_runs_due_keys_with_bounded_concurrency_and_wakes_early() -> None:
    async def main() -> None:
        q = Requeue(base=0.05, cap=0.05)
        running = peak = 0
        done: list[str] = []

        async def work(key: str) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.02)
            running -= 1
            done.append(key)

        for i in range(20):
            q.schedule(f"k{i}", 0)
        q.schedule("late", 3600)
        task = asyncio.create_task(q.run(work, concurrency=3))
        started = time.monotonic()
        while len(done) < 20 and time.monotonic() - started < 5:
            await asyncio.sleep(0.01)
        assert sorted(done) == sorted(f"k{i}" for i in range(20)) and peak == 3
        q.wake(["late"])  # a watch event: due now, not in an hour
        while "late" not in done and time.monotonic() - started < 5:
            await asyncio.sleep(0.01)
        assert "late" in done
        task.cancel()

    asyncio.run(main())

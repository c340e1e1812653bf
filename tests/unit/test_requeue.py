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


def test_a_trigger_never_postpones_a_key_but_the_works_own_decision_does() -> None:
    q = Requeue(base=1.0, cap=60.0)
    q.add("a")
    q.add("a", 30)  # a later trigger: still due now
    assert q.pop_due() == ["a"]
    q.schedule("b", 0)
    q.schedule("b", 30)  # the work's own requeue-after replaces its earlier one
    assert q.pop_due() == []


def test_one_worker_per_key_and_a_trigger_during_its_work_is_never_lost() -> None:
    """client-go's "dirty while processing": a spec change that arrives while the key's reconcile runs
    (on the older object) runs it once more afterwards, even when that reconcile ends healthy (`done`);
    and the key never runs twice at once."""
    async def main() -> None:
        q = Requeue(base=0.05, cap=0.05)
        runs: list[str] = []
        running: set[str] = set()
        overlap = False
        release = asyncio.Event()

        async def work(key: str) -> None:
            nonlocal overlap
            overlap |= key in running
            running.add(key)
            runs.append(key)
            if len(runs) == 1:
                q.add("a")  # a watch event while the first run works
                q.schedule("a", 0)  # the loop pops it while it runs: deferred, not run beside it
                await release.wait()
            running.discard(key)
            q.done(key)

        q.add("a")
        task = asyncio.create_task(q.run(work, concurrency=4))
        await asyncio.sleep(0.1)
        assert runs == ["a"]  # not started a second time while the first runs
        release.set()
        for _ in range(100):
            if len(runs) >= 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        assert runs == ["a", "a"] and not overlap and "a" not in q

    asyncio.run(main())


def test_a_crashing_work_item_backs_off_instead_of_dropping_its_key() -> None:
    async def main() -> None:
        q = Requeue(base=0.05, cap=0.05)
        runs = 0

        async def work(key: str) -> None:
            nonlocal runs
            runs += 1
            if runs < 3:
                raise RuntimeError("a bug in a reconcile")
            q.done(key)

        q.add("a")
        task = asyncio.create_task(q.run(work, concurrency=1))
        for _ in range(200):
            if runs >= 3:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        assert runs == 3 and "a" not in q

    asyncio.run(main())

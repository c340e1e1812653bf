"""The threads that run libvirt calls: reused, never shared with a hung call, gone when idle."""

from __future__ import annotations

import threading
import time

from libvirt_operator.adapters.libvirt.threads import CallThreads


def _wait(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_calls_one_after_another_reuse_one_thread_named_after_the_call() -> None:
    pool = CallThreads(idle_seconds=5)
    seen: list[tuple[int, str]] = []
    for i in range(20):
        done = threading.Event()
        pool.submit(f"libvirt-h-op{i}", lambda: (seen.append((threading.get_ident(),
                                                              threading.current_thread().name)), done.set()))
        assert done.wait(5)
        _wait(lambda: pool.idle() == 1)
    assert pool.started == 1
    assert len({ident for ident, _ in seen}) == 1
    assert [name for _, name in seen] == [f"libvirt-h-op{i}" for i in range(20)]


def test_a_hung_call_keeps_its_thread_and_the_next_call_runs_at_once() -> None:
    pool = CallThreads(idle_seconds=5)
    release = threading.Event()
    hung_started, other_done = threading.Event(), threading.Event()
    pool.submit("hung", lambda: (hung_started.set(), release.wait(10)))
    assert hung_started.wait(5)
    pool.submit("other", other_done.set)
    assert other_done.wait(5), "a call waited behind a hung one"
    assert pool.started == 2
    release.set()
    _wait(lambda: pool.idle() == 2)


def test_a_failing_call_does_not_kill_its_thread() -> None:
    pool = CallThreads(idle_seconds=5)
    pool.submit("boom", lambda: 1 / 0)
    _wait(lambda: pool.idle() == 1)
    done = threading.Event()
    pool.submit("next", done.set)
    assert done.wait(5)
    assert pool.started == 1


def test_idle_threads_end() -> None:
    pool = CallThreads(idle_seconds=0.1)
    gates = [threading.Event() for _ in range(3)]
    for i, gate in enumerate(gates):
        pool.submit(f"idle-end-{i}", gate.wait, 5)
    for gate in gates:
        gate.set()
    _wait(lambda: pool.idle() == 0 and not [t for t in threading.enumerate()
                                            if t.name.startswith("idle-end-")])


def test_every_call_runs_exactly_once_when_submitters_race_threads_that_time_out() -> None:
    pool = CallThreads(idle_seconds=0.001)  # threads leave while others claim them
    counts = [0] * 4000
    lock = threading.Lock()

    def job(i: int) -> None:
        with lock:
            counts[i] += 1

    def submitter(start: int) -> None:
        for i in range(start, 4000, 4):
            pool.submit("race", job, i)
            if i % 50 == 0:
                time.sleep(0.002)

    submitters = [threading.Thread(target=submitter, args=(k,)) for k in range(4)]
    for t in submitters:
        t.start()
    for t in submitters:
        t.join()
    _wait(lambda: sum(counts) == 4000, timeout=20)
    assert set(counts) == {1}

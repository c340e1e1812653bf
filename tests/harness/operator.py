"""Run the real operator in-process (its own thread and event loop) against the test apiserver."""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from libvirt_operator.cli.operator_main import OperatorOptions, run_operator
from libvirt_operator.core.logs import configure
from libvirt_operator.core.settings import Settings


class InProcessOperator:
    def __init__(self, kubeconfig: Path, settings: Settings | None = None, namespaces: tuple[str, ...] = ()) -> None:
        self.kubeconfig = kubeconfig
        settings = settings or Settings(knowledge_base_enabled=False, allow_test_driver=True,
                                        test_driver_dirs=(tempfile.gettempdir(),))
        self.options = OperatorOptions(namespaces=namespaces, metrics_port=0, liveness_port=0,
                                       knowledge_base=settings.knowledge_base_enabled, settings=settings)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: threading.Event | None = None
        self._error: BaseException | None = None
        self.memo: Any = None

    def start(self, timeout: float = 30) -> InProcessOperator:
        configure("console", "INFO")  # as `run` does: stderr, never stdout (a CLI test captures stdout)
        os.environ["KUBECONFIG"] = str(self.kubeconfig)
        ready = threading.Event()
        self._stop = threading.Event()

        def main() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(run_operator(self.options, stop_flag=self._stop, ready_flag=ready))
            except BaseException as err:  # surfaced to the test via .check()
                self._error = err
                ready.set()
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=main, name="operator", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("operator did not become ready")
        self.check()
        return self

    def check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"operator crashed: {self._error!r}") from self._error

    @property
    def runtime(self) -> Any:
        """The operator's Runtime (pool, kube client, …) for white-box assertions."""
        from libvirt_operator.handlers.startup import RUNTIME_KEY, current_memo
        return current_memo()[RUNTIME_KEY]

    def call(self, coro_fn: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the operator's loop (e.g. to inspect a libvirt host it is connected to)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(timeout)

    def stop(self, timeout: float = 30) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("operator did not stop in time")
        self._thread = None

    def __enter__(self) -> InProcessOperator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

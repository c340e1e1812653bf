"""Reconcile metrics and per-resource log binding around every handler.

controller-runtime's semantics (core.metrics): a reconcile that ended in an error is counted as
`result="error"` and in `controller_runtime_reconcile_errors_total`, whether it raised (kopf's
TemporaryError and PermanentError included) or returned after writing an error into the status
(`ended_with`); `requeue_after` is a reconcile without error that asked to be looked at again.
A timer (`@reconciler(..., timer=True)`) ticks every few seconds: a tick is a reconcile only once
the handler says it does work (`working()`); the ticks that find nothing due are not counted.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog

from ..core.metrics import ACTIVE_WORKERS, RECONCILE_ERRORS, RECONCILE_TIME, RECONCILE_TOTAL

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class _Run:
    __slots__ = ("counted", "result")

    def __init__(self, counted: bool) -> None:
        self.counted = counted
        self.result = "success"


_RUN: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("reconcile_run", default=None)


def working() -> None:
    """Inside a timer reconcile: this tick does work, count it (a no-op elsewhere)."""
    run = _RUN.get()
    if run is not None:
        run.counted = True


def ended_with(error: object | None, requeue_after: float | None = None) -> None:
    """Inside a reconcile: how it ended when it returns normally. An error (written to the status)
    makes it `result="error"`; a later call cannot turn an error back into a success."""
    run = _RUN.get()
    if run is None or run.result == "error":
        return
    if error is not None:
        run.result = "error"
    elif requeue_after is not None:
        run.result = "requeue_after"


def reconciler(controller: str, kind: str, *, timer: bool = False) -> Callable[[F], F]:
    """controller-runtime style metrics (result: success, error, requeue_after) + log context."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            meta = kwargs.get("meta") or {}
            run = _Run(counted=not timer)
            token = _RUN.set(run)
            with structlog.contextvars.bound_contextvars(
                    kind=kind, namespace=meta.get("namespace"), name=meta.get("name")):
                started = time.perf_counter()
                workers = ACTIVE_WORKERS.labels(controller)
                workers.inc()
                try:
                    return await fn(*args, **kwargs)
                except asyncio.CancelledError:  # stopped (shutdown, deletion): not an outcome
                    raise
                except BaseException:  # kopf.TemporaryError too: it is an error that kopf retries
                    run.counted, run.result = True, "error"
                    raise
                finally:
                    workers.dec()
                    _RUN.reset(token)
                    if run.counted:
                        RECONCILE_TIME.labels(controller).observe(time.perf_counter() - started)
                        RECONCILE_TOTAL.labels(controller, run.result).inc()
                        if run.result == "error":
                            RECONCILE_ERRORS.labels(controller).inc()
        return wrapper  # type: ignore[return-value]
    return wrap

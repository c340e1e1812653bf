"""Reconcile metrics and per-resource log binding around every handler."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import kopf
import structlog

from ..core.metrics import RECONCILE_ERRORS, RECONCILE_TIME, RECONCILE_TOTAL

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def reconciler(controller: str, kind: str) -> Callable[[F], F]:
    """controller-runtime style metrics (result: success, error, requeue) + log context."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            meta = kwargs.get("meta") or {}
            with structlog.contextvars.bound_contextvars(
                    kind=kind, namespace=meta.get("namespace"), name=meta.get("name")):
                started = time.perf_counter()
                result = "success"
                try:
                    return await fn(*args, **kwargs)
                except kopf.TemporaryError:
                    result = "requeue"
                    raise
                except BaseException:
                    result = "error"
                    RECONCILE_ERRORS.labels(controller).inc()
                    raise
                finally:
                    RECONCILE_TIME.labels(controller).observe(time.perf_counter() - started)
                    RECONCILE_TOTAL.labels(controller, result).inc()
        return wrapper  # type: ignore[return-value]
    return wrap

"""Standard conditions with kstatus polarity: Ready (positive), Reconciling and Stalled (abnormal-true)."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterable
from typing import Any

from .errors import redact
from .timestamps import now, timestamp  # noqa: F401 - also imported from here (reconcile.vm)

READY, RECONCILING, STALLED = "Ready", "Reconciling", "Stalled"




def set_condition(conditions: Iterable[dict[str, Any]], type_: str, status: bool | str, reason: str,
                  message: str = "", generation: int | None = None,
                  at: dt.datetime | None = None) -> list[dict[str, Any]]:
    """A new list with `type_` set; lastTransitionTime only moves when the status changes."""
    status_text = status if isinstance(status, str) else ("True" if status else "False")
    result: list[dict[str, Any]] = []
    found = False
    for cond in conditions:
        if cond.get("type") != type_:
            result.append(dict(cond))
            continue
        found = True
        changed = cond.get("status") != status_text
        result.append(_condition(type_, status_text, reason, message, generation,
                                 timestamp(at) if changed else cond.get("lastTransitionTime") or timestamp(at)))
    if not found:
        result.append(_condition(type_, status_text, reason, message, generation, timestamp(at)))
    return result


def remove_condition(conditions: Iterable[dict[str, Any]], type_: str) -> list[dict[str, Any]]:
    return [dict(c) for c in conditions if c.get("type") != type_]


def get_condition(conditions: Iterable[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or () if c.get("type") == type_), None)


def is_true(conditions: Iterable[dict[str, Any]] | None, type_: str) -> bool:
    cond = get_condition(conditions, type_)
    return bool(cond and cond.get("status") == "True")


@functools.lru_cache(maxsize=4096)
def _redacted(message: str) -> str:
    """redact() is pure and costs ~0.2 ms; set_condition runs it for every condition of every status."""
    return redact(message)[:32768]


def _condition(type_: str, status: str, reason: str, message: str, generation: int | None,
               last_transition: str) -> dict[str, Any]:
    cond: dict[str, Any] = {"type": type_, "status": status, "reason": reason, "message": _redacted(message),
                            "lastTransitionTime": last_transition}
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def summarize(conditions: list[dict[str, Any]], *, ready: bool, reason: str, message: str,
              generation: int | None, reconciling: bool = False, stalled: bool = False) -> list[dict[str, Any]]:
    """Set the three kstatus conditions at once, consistently."""
    conditions = set_condition(conditions, READY, ready, reason, message, generation)
    if reconciling:
        conditions = set_condition(conditions, RECONCILING, True, reason, message, generation)
    else:
        conditions = remove_condition(conditions, RECONCILING)
    if stalled:
        conditions = set_condition(conditions, STALLED, True, reason, message, generation)
    else:
        conditions = remove_condition(conditions, STALLED)
    return conditions

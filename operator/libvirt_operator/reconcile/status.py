"""Status bookkeeping shared by the reconcilers."""

from __future__ import annotations

from typing import Any


def merge_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning `old` into `new` at the top level (removed keys become null)."""
    patch: dict[str, Any] = {k: None for k in (old or {}) if k not in new}
    patch.update({k: v for k, v in new.items() if (old or {}).get(k) != v})
    return patch


def without_volatile(status: dict[str, Any] | None, volatile: tuple[str, ...] = ("lastProbeTime",)) -> dict[str, Any]:
    return {k: v for k, v in (status or {}).items() if k not in volatile}

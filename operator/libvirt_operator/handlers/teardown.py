"""Our own finalizer, next to kopf's, on VirtualMachines and ISOImages.

It is added by the spec-driven handlers (none can be added once a deletion started) and keeps an
object whose teardown is blocked after kopf's finalizer is gone, so the retries run in a requeue
loop instead of sleeping in a kopf worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.api.common import FINALIZER, GROUP

TEARDOWN_FINALIZER = f"{GROUP}/teardown"


def held_for_teardown(meta: Mapping[str, Any]) -> bool:
    """Deleting, kopf done with it (its finalizer gone), ours still there: the teardown is ours to retry."""
    finalizers = meta.get("finalizers") or []
    return bool(meta.get("deletionTimestamp")) and TEARDOWN_FINALIZER in finalizers and FINALIZER not in finalizers


def hold_for_teardown(body: Any) -> None:
    """A kopf patch function (applied with kopf's own patch of the object)."""
    finalizers = body.setdefault("metadata", {}).setdefault("finalizers", [])
    if TEARDOWN_FINALIZER not in finalizers:
        finalizers.append(TEARDOWN_FINALIZER)


def release_teardown(body: Any) -> None:
    """A kopf patch function: drop our finalizer in the same patch that drops kopf's."""
    finalizers = (body.get("metadata") or {}).get("finalizers") or []
    while TEARDOWN_FINALIZER in finalizers:
        finalizers.remove(TEARDOWN_FINALIZER)

"""Our own finalizer on VirtualMachines and ISOImages.

ISOImages: next to kopf's, added by the spec-driven handlers (none can be added once a deletion
started); it keeps an image whose teardown is blocked after kopf's finalizer is gone, so the retries
run in a queue instead of sleeping in a kopf worker. VirtualMachines: the only finalizer, added by
the VM work item (handlers.vm_reconcile) before anything is placed or created.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.api.common import FINALIZER, GROUP
from ..core.errors import AppError
from ..core.logs import get_logger
from ..reconcile.runtime import Runtime

log = get_logger(__name__)

TEARDOWN_FINALIZER = f"{GROUP}/teardown"


def held_for_teardown(meta: Mapping[str, Any]) -> bool:
    """Deleting, kopf done with it (its finalizer gone), ours still there: the teardown is ours to retry."""
    finalizers = meta.get("finalizers") or []
    return bool(meta.get("deletionTimestamp")) and TEARDOWN_FINALIZER in finalizers and FINALIZER not in finalizers


async def hold_for_teardown(rt: Runtime, plural: str, meta: Mapping[str, Any]) -> None:
    """Add our finalizer with a patch of our own (read, precondition, retry). Not a kopf patch function:
    kopf keeps a function whose patch failed (a conflict, or HTTP 422 once a deletion started: no new
    finalizer is accepted then) for its next cycle and runs none of the object's handlers while one is
    pending, so a VM deleted meanwhile would wait for a teardown that never starts. Best effort: without
    our finalizer kopf's still holds the object (the delete handler then retries in kopf's worker)."""
    try:
        await rt.kube.add_finalizer(plural, meta["namespace"], meta["name"], TEARDOWN_FINALIZER)
    except AppError as err:
        log.info("adding the teardown finalizer failed; the next reconcile tries again", name=meta.get("name"),
                 namespace=meta.get("namespace"), code=err.code.value, error=err.message)


def release_teardown(body: Any) -> None:
    """A kopf patch function: drop our finalizer in the same patch that drops kopf's."""
    finalizers = (body.get("metadata") or {}).get("finalizers") or []
    while TEARDOWN_FINALIZER in finalizers:
        finalizers.remove(TEARDOWN_FINALIZER)

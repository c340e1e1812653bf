"""Our own finalizer on VirtualMachines and ISOImages: the only finalizer on either (kopf keeps none).

Added by the kind's work item (handlers.vm_reconcile, handlers.iso_reconcile) with a patch of its own
(`KubeClient.ensure_finalizer`: resourceVersion precondition, never once a deletion started) before
anything is created on a host for the object; removed by the work item when the teardown is done. A
blocked teardown keeps the object and is retried by the kind's work queue, never in a kopf worker.
"""

from __future__ import annotations

from ..core.api.common import GROUP

TEARDOWN_FINALIZER = f"{GROUP}/teardown"

"""Operator start-up and clean-up: settings, the libvirt event loop bridge, shared collaborators."""

from __future__ import annotations

import os
from typing import Any

import asyncio
import logging

import kopf

from ..adapters.kube import KubeClient
from ..adapters.libvirt import HostPool, credentials
from ..adapters.libvirt.events import ensure_event_thread
from ..core.api.common import FINALIZER, GROUP
from ..core.logs import get_logger
from ..core.metrics import initialise_series
from ..core.settings import Settings
from ..reconcile.runtime import Runtime

log = get_logger(__name__)
RUNTIME_KEY = "runtime"
CONSOLE_SERVER_KEY = "console_server"  # set by cli/operator_main.py when it serves the console API
_current_memo: Any = None


def current_memo() -> Any:
    """The memo of the operator running in this process (for in-process tests and the dev command)."""
    return _current_memo


def runtime_of(memo: Any) -> Runtime:
    return memo[RUNTIME_KEY]


def _remediator(op_settings: Settings, memo: kopf.Memo) -> Any:
    """The knowledge base, or fixed per-code links when it is disabled or cannot be set up."""
    from ..adapters.rag import FixedLinks, KnowledgeBase  # cheap: numpy/onnxruntime load on first use

    if op_settings.knowledge_base_enabled:
        try:
            kb = KnowledgeBase.from_settings(op_settings)
            # Load the query snapshot and the ONNX model now (no torch, no lancedb: ~0.5 s), in a
            # worker thread; reconciles meanwhile get the fixed link, and failures only mark the
            # knowledge base unhealthy.
            memo["kb_warmup"] = asyncio.create_task(kb.warm_up())
            return kb
        except Exception as err:  # a broken knowledge base never stops the operator
            log.error("knowledge base unavailable; using fixed runbook links", error=str(err))
    return FixedLinks(op_settings.remediation_base_url)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account first, else KUBECONFIG — whatever client libraries are installed."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


CONTROLLERS = ("virtualmachine", "isoimage", "libvirthost", "virtualmachinemigration")  # the names the handlers pass to @reconciler


class LeanDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's annotation diff-base, built without deep-copying what it throws away.

    kopf builds the "essence" of EVERY watch event of every resource (handlers or not) by deep-copying
    the whole body (status and managedFields included) and then deleting metadata and status. At 1000
    VMs that was the largest single cost of the event loop (~6 events per VM). Same essence: copy only
    what is kept (spec and the like, labels, annotations). With extra fields (handlers on status
    fields: none today) kopf's own build runs."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        if extra_fields:
            return super().build(body=body, extra_fields=extra_fields)
        meta = body.get("metadata") or {}
        thin = {k: v for k, v in body.items() if k not in ("metadata", "status")}
        thin["metadata"] = {k: meta[k] for k in ("labels", "annotations") if k in meta}
        essence = kopf.DiffBaseStorage.build(self, body=thin)  # type: ignore[arg-type]
        self.remove_annotations(essence, set(self.make_keys(self.key, body=body)))
        self.remove_empty_stanzas(essence)
        return essence


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = LeanDiffBaseStorage(prefix=GROUP)
    # Only warnings from kopf's own logs become Events; our transitions post their own Events
    # (explicit CamelCase reasons), so `kubectl describe` is not flooded by "Handler succeeded".
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.queueing.worker_limit = int(os.environ.get("LIBVIRT_OPERATOR_WORKER_LIMIT", "200"))
    # kopf keeps an object's watch worker idle for `idle_timeout` after its last event, holding one of
    # the `worker_limit` slots; our watch handlers only cache and queue (microseconds), so at kopf's 5 s
    # a burst of new objects waited for slots: 200 / 5 s capped a 1,000-VM burst at ~36 VMs/s.
    settings.queueing.idle_timeout = float(os.environ.get("LIBVIRT_OPERATOR_WATCH_IDLE_SECONDS", "0.5"))
    # A deleted LibvirtHost waits for its daemons (probe loop, VM round) to stop before kopf's finalizer
    # goes; they stop within a second of kopf's signal, but kopf's defaults would look again only
    # after 60 s (cancellation_polling).
    settings.background.instant_exit_timeout = max(settings.background.instant_exit_timeout or 0, 1.0)
    settings.background.cancellation_polling = min(settings.background.cancellation_polling, 2.0)
    ensure_event_thread()
    initialise_series(CONTROLLERS)
    op_settings: Settings = memo.get("settings") or Settings()
    kube = await KubeClient.create(os.environ.get("KUBECONFIG"))
    remediator = _remediator(op_settings, memo)
    global _current_memo
    _current_memo = memo
    # Before any connection of ours: what a killed earlier process left (private keys, a running ssh).
    if stale := credentials.remove_stale():
        log.info("removed credential directories an earlier operator process left", count=len(stale))
    memo[RUNTIME_KEY] = Runtime(settings=op_settings, pool=HostPool(), kube=kube, remediator=remediator,
                                namespaces=tuple(memo.get("namespaces") or ()))


@kopf.on.probe(id="knowledgeBase")
def knowledge_base_health(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
    """Shown in /healthz: DATABASE_ERROR when runbook links fall back to fixed per-code links."""
    rt: Runtime | None = memo.get(RUNTIME_KEY)
    kb = rt.remediator if rt else None
    if kb is None or not hasattr(kb, "warm_up"):
        return {"enabled": False}
    if kb.healthy:
        return {"enabled": True, "healthy": True}
    return {"enabled": True, "healthy": False, "code": "DATABASE_ERROR", "error": str(kb.last_error or "")[:200]}


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    rt: Runtime | None = memo.get(RUNTIME_KEY)
    if rt is None:
        return
    await rt.pool.close_all()
    await rt.kube.close()

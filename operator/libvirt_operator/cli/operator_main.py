"""Run kopf with our settings, metrics server and logging; usable in-process by tests."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Literal

import kopf
from prometheus_client import start_http_server

from ..core.logs import configure
from ..core.settings import Settings


@dataclasses.dataclass
class OperatorOptions:
    namespaces: tuple[str, ...] = ()
    metrics_port: int = 8080
    metrics_address: str = "0.0.0.0"
    liveness_port: int = 8081
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"
    knowledge_base: bool = True
    settings: Settings | None = None


def _load_handlers() -> None:
    from .. import handlers  # noqa: F401  (registers with kopf's default registry)


async def run_operator(options: OperatorOptions, *, stop_flag: asyncio.Event | threading.Event | None = None,
                       ready_flag: asyncio.Event | threading.Event | None = None) -> None:
    _load_handlers()
    settings = options.settings or Settings(knowledge_base_enabled=options.knowledge_base)
    memo = kopf.Memo(settings=settings)
    await kopf.operator(
        standalone=True,
        clusterwide=not options.namespaces,
        namespaces=list(options.namespaces),
        liveness_endpoint=(f"http://0.0.0.0:{options.liveness_port}/healthz" if options.liveness_port else None),
        memo=memo,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def run_blocking(options: OperatorOptions) -> None:
    configure(options.log_format, options.log_level)
    if options.metrics_port:
        start_http_server(options.metrics_port, addr=options.metrics_address)
    asyncio.run(run_operator(options))

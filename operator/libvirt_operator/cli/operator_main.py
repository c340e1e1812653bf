"""Run kopf with our settings, metrics server and logging; usable in-process by tests."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import pathlib
import sys
import threading
from collections.abc import Callable
from typing import Any, Literal

import click
import kopf

from ..core.logs import configure
from ..core.quantity import parse_quantity
from ..core.settings import Settings
from .leader_election import LeaderElectionOptions, run_elected
from .metrics_server import serve_metrics


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
    # Off by default (`make run`, the test harness, a single process); the chart and manifests/deploy
    # turn it on (--leader-elect) and run two replicas.
    leader_election: LeaderElectionOptions = dataclasses.field(default_factory=LeaderElectionOptions)


def settings_from_options(*, knowledge_base: bool = True, rag_db: str | None = None,
                          remediation_base_url: str | None = None, download_allow: tuple[str, ...] = (),
                          download_deny: tuple[str, ...] = (), iso_cache_dir: str | None = None,
                          download_max_size: str | None = None, max_concurrent_imports: int | None = None,
                          allow_test_driver: bool = False, test_driver_dirs: tuple[str, ...] = ()) -> Settings:
    """Settings from command-line values; unset values keep their defaults."""
    defaults = Settings()
    try:
        allow = tuple(ipaddress.ip_network(n, strict=False) for n in download_allow)
        deny = tuple(ipaddress.ip_network(n, strict=False) for n in download_deny)
    except ValueError as err:
        raise click.BadParameter(str(err)) from err
    changes: dict[str, object] = {
        "knowledge_base_enabled": knowledge_base,
        "download_allowed_networks": allow,
        "download_denied_networks": defaults.download_denied_networks + deny,
        "allow_test_driver": allow_test_driver,
        "test_driver_dirs": tuple(str(pathlib.Path(d).resolve()) for d in test_driver_dirs),
    }
    if test_driver_dirs and not allow_test_driver:
        raise click.BadParameter("--test-driver-dir needs --allow-test-driver")
    if download_max_size is not None:
        try:
            changes["download_max_bytes"] = parse_quantity(download_max_size)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--download-max-size") from err
    if max_concurrent_imports is not None:
        if max_concurrent_imports < 1:
            raise click.BadParameter("must be at least 1", param_hint="--max-concurrent-imports")
        changes["iso_max_concurrent_imports"] = max_concurrent_imports
    if rag_db:
        changes["rag_db_dir"] = rag_db
    if remediation_base_url:
        changes["remediation_base_url"] = remediation_base_url.rstrip("/")
    if iso_cache_dir:
        changes["iso_cache_dir"] = iso_cache_dir
    return dataclasses.replace(defaults, **changes)  # type: ignore[arg-type]


def _load_handlers() -> None:
    from .. import handlers  # noqa: F401  (registers with kopf's default registry)


async def run_operator(options: OperatorOptions, *, stop_flag: asyncio.Event | threading.Event | None = None,
                       ready_flag: asyncio.Event | threading.Event | None = None,
                       on_lost: Callable[[str], None] | None = None) -> None:
    """With leader election, kopf runs only while this process holds the Lease (cli/leader_election.py);
    a lost lease calls `on_lost`, else raises LeadershipLost."""
    _load_handlers()
    settings = options.settings or Settings(knowledge_base_enabled=options.knowledge_base)
    memo = kopf.Memo(settings=settings, namespaces=tuple(options.namespaces))  # the orphan report's scope
    console = await _start_console(settings, memo)
    try:
        await _run(options, memo, stop_flag, ready_flag, on_lost)
    finally:
        if console is not None:
            await console.cleanup()


async def _start_console(settings: Settings, memo: kopf.Memo) -> Any:
    """The console API, in every replica (elected or not); a failure (no front proxy configured, no
    permission to read its CA) disables consoles only, never the operator."""
    if settings.console_port is None:
        return None
    from ..core.logs import get_logger
    from ..handlers.console_api import start_console_server
    from ..handlers.startup import CONSOLE_SERVER_KEY

    try:
        memo[CONSOLE_SERVER_KEY] = server = await start_console_server(settings, os.environ.get("KUBECONFIG"))
    except Exception as err:  # noqa: BLE001
        get_logger(__name__).error("console API not started: consoles are unavailable", error=str(err))
        return None
    return server


async def _run(options: OperatorOptions, memo: kopf.Memo, stop_flag: asyncio.Event | threading.Event | None,
               ready_flag: asyncio.Event | threading.Event | None, on_lost: Callable[[str], None] | None) -> None:
    async def run_kopf(flag: asyncio.Event | threading.Event | None) -> None:
        await kopf.operator(
            standalone=True,  # no kopf peering: one process acts, the Lease's holder when elected
            clusterwide=not options.namespaces,
            namespaces=list(options.namespaces),
            liveness_endpoint=(f"http://0.0.0.0:{options.liveness_port}/healthz" if options.liveness_port else None),
            memo=memo,
            stop_flag=flag,
            ready_flag=ready_flag,
        )

    if not options.leader_election.enabled:
        await run_kopf(stop_flag)
        return
    await run_elected(options.leader_election, liveness_port=options.liveness_port, run_kopf=run_kopf,
                      stop_flag=stop_flag, on_lost=on_lost)


def _exit_at_once(reason: str) -> None:
    """The lease is lost: stop acting now (libvirt calls in worker threads included), as
    controller-runtime's manager does; the kubelet restarts the container as a candidate."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(1)


def run_blocking(options: OperatorOptions) -> None:
    configure(options.log_format, options.log_level)
    if options.metrics_port:
        serve_metrics(options.metrics_port, addr=options.metrics_address)
    asyncio.run(run_operator(options, on_lost=_exit_at_once))

"""`libvirt-operator run --leader-elect`: two or more replicas, one writer.

Every replica campaigns for a coordination.k8s.io/v1 Lease (adapters/kube/leader.py); only the holder
runs kopf (handlers, timers, daemons, watches). A replica that loses the lease stops acting at once:
the process exits with status 1 (as controller-runtime's manager does) and the kubelet restarts it as
a candidate. On SIGTERM the leader stops kopf, then releases the lease, so another replica takes over
within about a retry period instead of a lease duration.

Readiness: a waiting replica is Ready. It serves /healthz on the liveness port ({"leader": false}) so
a rolling update (maxUnavailable 0) can proceed: the new pod becomes Ready as a candidate, the old
leader is terminated and releases the lease. /healthz answers 500 when the campaign itself crashed.
Once elected, the endpoint is kopf's own (its probes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import signal
import socket
import threading
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import click
import structlog


if TYPE_CHECKING:  # the adapter (kubernetes_asyncio) loads when the operator runs, not for `--help`
    from ..adapters.kube.leader import LeaderElector, LeaseSettings

# Lazy (not core.logs.get_logger, which binds at once): this module is imported before logging is configured.
log = structlog.get_logger(__name__)
_SA_NAMESPACE = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_LEASE_NAME = "libvirt-operator"


class LeadershipLost(RuntimeError):
    """This replica lost the lease; it must stop acting (the CLI exits with status 1)."""


@dataclasses.dataclass(frozen=True)
class LeaderElectionOptions:
    enabled: bool = False
    name: str = DEFAULT_LEASE_NAME
    namespace: str | None = None  # None: POD_NAMESPACE, else the service account's namespace
    identity: str | None = None  # None: POD_NAME, else hostname_pid
    # Takeover after a killed leader ≤ lease_duration + 2 × retry_period ≈ 12 s.
    lease_duration: int = 10
    renew_deadline: float = 7.0
    retry_period: float = 1.0

    def resolve(self) -> LeaseSettings:
        from ..adapters.kube.leader import LeaseSettings

        namespace = self.namespace or os.environ.get("POD_NAMESPACE") or _service_account_namespace()
        if not namespace:
            raise click.BadParameter("not running in a cluster: give the Lease's namespace",
                                     param_hint="--leader-election-namespace")
        identity = self.identity or os.environ.get("POD_NAME") or f"{socket.gethostname()}_{os.getpid()}"
        settings = LeaseSettings(name=self.name, namespace=namespace, identity=identity,
                                 lease_duration=self.lease_duration, renew_deadline=self.renew_deadline,
                                 retry_period=self.retry_period)
        if problems := settings.problems():
            raise click.BadParameter("; ".join(problems), param_hint="--leader-election-*")
        return settings


def _service_account_namespace() -> str | None:
    try:
        return _SA_NAMESPACE.read_text().strip() or None
    except OSError:
        return None


def leader_election_click_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The `run` command's leader-election flags (controller-runtime's names)."""
    d = LeaderElectionOptions()
    for option in reversed([
        click.option("--leader-elect/--no-leader-elect", "leader_elect", default=False, show_default=True,
                     help="Campaign for a Lease; only the holder acts (run several replicas). The chart turns it on."),
        click.option("--leader-election-id", "leader_election_id", default=d.name, show_default=True,
                     help="Name of the coordination.k8s.io/v1 Lease."),
        click.option("--leader-election-namespace", "leader_election_namespace", default=None,
                     help="Namespace of the Lease. [default: $POD_NAMESPACE, else the service account's]"),
        click.option("--leader-election-lease-duration", "leader_election_lease_duration",
                     type=click.IntRange(min=1), default=d.lease_duration, show_default=True,
                     help="Seconds a candidate waits after the last renewal it saw before taking the lease over."),
        click.option("--leader-election-renew-deadline", "leader_election_renew_deadline",
                     type=click.FloatRange(min=1), default=d.renew_deadline, show_default=True,
                     help="Seconds the leader keeps trying to renew before it gives up and exits."),
        click.option("--leader-election-retry-period", "leader_election_retry_period",
                     type=click.FloatRange(min=1), default=d.retry_period, show_default=True,
                     help="Seconds between attempts to acquire or renew."),
    ]):
        func = option(func)
    return func


def options_from_click(*, leader_elect: bool, leader_election_id: str, leader_election_namespace: str | None,
                       leader_election_lease_duration: int, leader_election_renew_deadline: float,
                       leader_election_retry_period: float) -> LeaderElectionOptions:
    opts = LeaderElectionOptions(enabled=leader_elect, name=leader_election_id,
                                 namespace=leader_election_namespace,
                                 lease_duration=leader_election_lease_duration,
                                 renew_deadline=leader_election_renew_deadline,
                                 retry_period=leader_election_retry_period)
    if leader_elect:
        opts.resolve()  # fail at start-up on bad values, not later
    return opts


async def _serve_waiting_health(port: int, elector: LeaderElector) -> Any:
    """/healthz while waiting for the lease (kopf's own endpoint replaces it once elected)."""
    from aiohttp import web

    async def healthz(_: web.Request) -> web.Response:
        body = {"leader": False, "lease": elector.settings.name, "holder": elector.holder,
                "identity": elector.settings.identity}
        return web.json_response(body, status=500 if elector.failed else 200)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


async def _wait_flag(flag: asyncio.Event | threading.Event | None) -> None:
    if flag is None:
        await asyncio.Event().wait()
    elif isinstance(flag, asyncio.Event):
        await flag.wait()
    else:
        while not flag.is_set():
            await asyncio.sleep(0.2)


async def _forward_late_signal(stop: asyncio.Event, kopf_task: asyncio.Task[None]) -> None:
    """A SIGTERM caught by our handler just before kopf installed its own: hand it on to kopf."""
    await stop.wait()
    while not kopf_task.done() and threading.current_thread() is threading.main_thread():
        await asyncio.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)


async def run_elected(options: LeaderElectionOptions, *, liveness_port: int,
                      run_kopf: Callable[[asyncio.Event | threading.Event | None], Coroutine[Any, Any, None]],
                      stop_flag: asyncio.Event | threading.Event | None = None,
                      on_lost: Callable[[str], None] | None = None) -> None:
    """Campaign; once elected run `run_kopf(stop_flag)`; when kopf stops (SIGTERM/SIGINT, `stop_flag`)
    release the lease. Lost lease: `on_lost(reason)` (the CLI exits the process there), else kopf is
    cancelled and LeadershipLost raised."""
    from ..adapters.kube.leader import LeaderElector, new_api_client

    settings = options.resolve()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):  # kopf installs its own once it runs
            loop.add_signal_handler(sig, stop.set)
    api = await new_api_client(os.environ.get("KUBECONFIG"))
    elector = LeaderElector(settings, api, on_lost=on_lost)
    external = asyncio.create_task(_wait_flag(stop_flag), name="stop-flag")
    external.add_done_callback(lambda _: stop.set())
    health = await _serve_waiting_health(liveness_port, elector) if liveness_port else None
    try:
        elector.start()
        waiting = [asyncio.create_task(elector.leading.wait()), asyncio.create_task(stop.wait())]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for task in waiting:
            task.cancel()
        if stop.is_set() or not elector.leading.is_set():
            log.info("leader election: stopping before being elected", identity=settings.identity)
            return
        if health is not None:
            await health.cleanup()
            health = None
        # kopf gets the caller's flag, not `stop`: kopf handles SIGTERM itself from here on, and a flag
        # it waits on but nobody sets would hold its shutdown for its 5 s "hung tasks" grace period.
        kopf_task = asyncio.create_task(run_kopf(stop_flag), name="kopf")
        lost_task = asyncio.create_task(elector.lost.wait())
        late = asyncio.create_task(_forward_late_signal(stop, kopf_task))
        await asyncio.wait([kopf_task, lost_task], return_when=asyncio.FIRST_COMPLETED)
        late.cancel()
        if elector.lost.is_set():
            kopf_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await kopf_task
            raise LeadershipLost(f"lost the lease {settings.namespace}/{settings.name}")
        lost_task.cancel()
        kopf_task.result()
    finally:
        external.cancel()
        await elector.release()
        if health is not None:
            await health.cleanup()
        await api.close()

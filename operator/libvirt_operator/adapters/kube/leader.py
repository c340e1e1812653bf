"""Leader election on a coordination.k8s.io/v1 Lease with kubernetes_asyncio's `leaderelection`
package (its LeaseLock reads the Lease and replaces it with the resourceVersion it read, so of two
candidates racing for an expired or released lease exactly one write succeeds; the other gets 409).

kopf's own peering is no substitute: it uses KopfPeering objects, not Leases, and two operators of the
same priority both pause instead of one of them acting.

What this module adds around the library, for controller-runtime's semantics:
- `on_lost` fires as soon as the leader has not renewed for `renew_deadline` (a watchdog on the last
  successful write: the library only notices when its current attempt ends, and that attempt may hang),
  or as soon as it reads the Lease with another holder;
- every API call has a timeout, and an error that is not an ApiException counts as a failed attempt
  (the library would let it escape from its loop);
- `release()`: on a clean shutdown the holder clears holderIdentity (client-go's ReleaseOnCancel), so
  a waiting candidate takes over at its next retry instead of when the lease expires;
- the `leader_election_master_status{name}` gauge (controller-runtime's) and a structured log line on
  every change of leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import time
from collections.abc import Callable
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.leaderelection.electionconfig import Config
from kubernetes_asyncio.leaderelection.leaderelection import LeaderElection
from kubernetes_asyncio.leaderelection.leaderelectionrecord import LeaderElectionRecord
from kubernetes_asyncio.leaderelection.resourcelock.leaselock import LeaseLock
from prometheus_client import Gauge
import structlog


# Lazy (not core.logs.get_logger, which binds at once): this module is imported before logging is configured.
log = structlog.get_logger(__name__)

LEADER_STATUS = Gauge(
    "leader_election_master_status",
    "Gauge of if the reporting system is master of the relevant lease, 0 indicates backup, 1 indicates "
    "master. 'name' is the string used to identify the lease. Please make sure to group by name.",
    ["name"])


@dataclasses.dataclass(frozen=True)
class LeaseSettings:
    """Durations in seconds, as controller-runtime's LeaseDuration / RenewDeadline / RetryPeriod.

    Defaults (10 / 7 / 1 s): a killed leader (no release) is replaced at most lease_duration +
    2 × retry_period ≈ 12 s after its last renewal; a leader that cannot renew stops after 7 s, 3 s
    before anyone may take the lease over."""

    name: str
    namespace: str
    identity: str
    lease_duration: int = 10  # whole seconds: Lease.spec.leaseDurationSeconds
    renew_deadline: float = 7.0
    retry_period: float = 1.0

    def problems(self) -> list[str]:
        """The library's own constraints (kubernetes_asyncio's electionconfig.Config), as messages."""
        out = []
        if min(self.lease_duration, self.renew_deadline, self.retry_period) < 1:
            out.append("lease duration, renew deadline and retry period must each be at least 1 s")
        if self.lease_duration <= self.renew_deadline:
            out.append("the lease duration must be longer than the renew deadline")
        if self.renew_deadline <= 1.2 * self.retry_period:
            out.append("the renew deadline must be longer than 1.2 × the retry period")
        if not self.name or not self.namespace or not self.identity:
            out.append("lease name, namespace and identity must not be empty")
        return out

    @property
    def call_timeout(self) -> float:
        return max(self.retry_period, self.renew_deadline / 3)


async def new_api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """An ApiClient of its own (its own connection pool: the operator's load never delays a renewal)."""
    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        await config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    return client.ApiClient(configuration=cfg)


def _failed(err: BaseException) -> ApiException:
    """A transport error or a timeout, in the shape the library expects from a failed read."""
    exc = ApiException(status=503, reason=f"{type(err).__name__}: {err}")
    exc.body = json.dumps({"code": 503})
    return exc


class _Lock(LeaseLock):
    """The library's LeaseLock with timeouts, and reporting to the elector what it reads and writes."""

    def __init__(self, elector: LeaderElector, api: client.ApiClient) -> None:
        s = elector.settings
        super().__init__(s.name, s.namespace, s.identity, api)
        self._elector = elector

    async def get(self, name: str, namespace: str) -> Any:
        try:
            ok, record = await asyncio.wait_for(super().get(name, namespace), self._elector.settings.call_timeout)
        except Exception as err:  # noqa: BLE001  (any failure is a failed attempt, retried by the library)
            log.warning("leader election: cannot read the lease", lease=name, namespace=namespace,
                        error=f"{type(err).__name__}: {err}")
            return False, _failed(err)
        if ok and isinstance(record, LeaderElectionRecord):
            self._elector._observed(record.holder_identity)
        return ok, record

    async def create(self, name: str, namespace: str, election_record: LeaderElectionRecord) -> bool:
        return await self._write(super().create(name, namespace, election_record))

    async def update(self, name: str, namespace: str, updated_record: LeaderElectionRecord) -> bool:
        return await self._write(super().update(name, namespace, updated_record))

    async def _write(self, call: Any) -> bool:
        started = time.monotonic()
        try:
            ok = bool(await asyncio.wait_for(call, self._elector.settings.call_timeout))
        except Exception as err:  # noqa: BLE001
            log.warning("leader election: cannot write the lease", lease=self.name, error=f"{type(err).__name__}: {err}")
            return False
        if ok:
            self._elector._renewed(started)
        return ok


class LeaderElector:
    """`start()` campaigns in the background; `leading` is set once this candidate holds the lease;
    `on_lost(reason)` is called (once) when it stops holding it; `release()` on shutdown."""

    def __init__(self, settings: LeaseSettings, api: client.ApiClient,
                 on_lost: Callable[[str], None] | None = None) -> None:
        if problems := settings.problems():
            raise ValueError("; ".join(problems))
        self.settings = settings
        self.api = api
        self.on_lost = on_lost
        self.leading = asyncio.Event()
        self.lost = asyncio.Event()
        self.holder: str | None = None  # the last holder read from the Lease
        self.failed: BaseException | None = None  # the campaign itself crashed (the liveness probe fails)
        self._last_renewal = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = _Lock(self, api)
        LEADER_STATUS.labels(name=settings.name).set(0)

    @property
    def is_leader(self) -> bool:
        return self.leading.is_set() and not self.lost.is_set()

    def start(self) -> None:
        log.info("leader election: campaigning", lease=self.settings.name, namespace=self.settings.namespace,
                 identity=self.settings.identity, lease_duration=self.settings.lease_duration,
                 renew_deadline=self.settings.renew_deadline, retry_period=self.settings.retry_period)
        self._tasks = [asyncio.create_task(self._campaign(), name="leader-election"),
                       asyncio.create_task(self._watchdog(), name="leader-election-watchdog")]

    async def _campaign(self) -> None:
        s = self.settings
        election = LeaderElection(Config(self._lock, lease_duration=s.lease_duration, renew_deadline=s.renew_deadline,
                                         retry_period=s.retry_period, onstarted_leading=self._started,
                                         onstopped_leading=self._stopped))
        while not self.lost.is_set():
            try:
                await election.run()  # returns only after leading and failing to renew
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001
                if self.is_leader:
                    self._lose(f"leader election failed: {type(err).__name__}: {err}")
                    return
                log.warning("leader election: campaign error, retrying", error=f"{type(err).__name__}: {err}")
                await asyncio.sleep(s.retry_period)
                continue
            if self.leading.is_set():
                self._lose("the lease could not be renewed")
                return

    async def _started(self) -> None:
        self._last_renewal = max(self._last_renewal, time.monotonic() - self.settings.call_timeout)
        self.holder = self.settings.identity
        LEADER_STATUS.labels(name=self.settings.name).set(1)
        log.info("leader election: acquired the lease, now leading", lease=self.settings.name,
                 namespace=self.settings.namespace, identity=self.settings.identity)
        self.leading.set()

    async def _stopped(self) -> None:
        self._lose("the lease could not be renewed within the renew deadline")

    async def _watchdog(self) -> None:
        period = min(0.25, self.settings.retry_period / 4)
        while not self.lost.is_set():
            await asyncio.sleep(period)
            if self.is_leader and time.monotonic() - self._last_renewal > self.settings.renew_deadline:
                self._lose(f"no renewal for {self.settings.renew_deadline:g} s (renew deadline)")

    def _renewed(self, started: float) -> None:
        # A write that was sent at `started` proves the lease was ours from then on, not from its reply.
        self._last_renewal = max(self._last_renewal, started)

    def _observed(self, holder: str | None) -> None:
        if holder != self.holder:
            log.info("leader election: leader changed", lease=self.settings.name, namespace=self.settings.namespace,
                     leader=holder or None, previous=self.holder, identity=self.settings.identity)
            self.holder = holder
        if self.is_leader and holder != self.settings.identity:
            self._lose(f"the lease is now held by {holder or 'nobody'}")

    def _lose(self, reason: str) -> None:
        if self.lost.is_set() or not self.leading.is_set():
            return
        self.lost.set()
        LEADER_STATUS.labels(name=self.settings.name).set(0)
        log.error("leader election: lost the lease, stopping", lease=self.settings.name,
                  namespace=self.settings.namespace, identity=self.settings.identity, reason=reason)
        if self.on_lost is not None:
            self.on_lost(reason)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    async def release(self) -> None:
        """Stop campaigning; if still the leader, hand the lease back (holderIdentity cleared, 1 s
        duration, written with the resourceVersion read: never over somebody else's lease)."""
        await self.stop()
        if not self.is_leader:
            return
        s = self.settings
        api = client.CoordinationV1Api(self.api)
        try:
            lease = await asyncio.wait_for(api.read_namespaced_lease(s.name, s.namespace), s.call_timeout)
            if lease.spec is None or lease.spec.holder_identity != s.identity:
                return
            now = datetime.datetime.now(datetime.timezone.utc)
            lease.spec.holder_identity = None
            lease.spec.lease_duration_seconds = 1
            lease.spec.acquire_time = now
            lease.spec.renew_time = now
            await asyncio.wait_for(api.replace_namespaced_lease(s.name, s.namespace, lease), s.call_timeout)
        except Exception as err:  # noqa: BLE001  (the lease then expires on its own)
            log.warning("leader election: could not release the lease", lease=s.name, error=f"{type(err).__name__}: {err}")
            return
        finally:
            self.leading.clear()
            LEADER_STATUS.labels(name=s.name).set(0)
        log.info("leader election: released the lease", lease=s.name, namespace=s.namespace, identity=s.identity)

"""Pure power-state planning: what to do with the domain (start, shut down, power off, nothing),
crash-loop backoff, eject-after-first-boot, the printable status.

Run strategies follow KubeVirt:
  Always          keep running; restart after any stop (crashes back off: CrashLoopBackOff).
  Halted          keep stopped: graceful shutdown, power off after the grace period.
  Manual          start once when created, then never touch the power state again.
  RerunOnFailure  start once; restart after a failure (crash, external power-off), with backoff;
                  a clean guest shutdown stays stopped.
  Once            start once; whatever way it stops, never restart.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum

from ..core.api.vm import StartFailure
from ..core.domain import DomainObservation, PowerState, StopCause
from ..core.timestamps import timestamp

# A run at least this long is "stable": it resets the crash-loop counter.
STABLE_RUN_SECONDS = 60.0
BACKOFF_BASE_SECONDS = 10.0
BACKOFF_CAP_SECONDS = 300.0
# After this many failed runs in a row the VM is Stalled (kstatus Failed: GitOps tools stop waiting
# and report it) while the backoff keeps retrying; a stable run clears it.
STALLED_AFTER_FAILURES = 3


class Action(str, enum.Enum):
    NONE = "None"
    START = "Start"
    SHUTDOWN = "Shutdown"    # graceful (ACPI)
    DESTROY = "Destroy"      # power off


@dataclasses.dataclass(frozen=True)
class PowerStatus:
    """The status fields the power plan reads and writes."""

    first_boot_time: dt.datetime | None = None
    last_start_time: dt.datetime | None = None
    stop_requested_time: dt.datetime | None = None
    start_failure: StartFailure | None = None


@dataclasses.dataclass(frozen=True)
class PowerPlan:
    action: Action
    desired_running: bool | None        # None: leave as is (Manual after first start)
    status: PowerStatus                 # the power fields to record
    printable: str
    ready: bool
    reason: str
    message: str
    requeue_after: float | None = None  # seconds until the plan may change by itself


def start_backoff(consecutive_failures: int) -> float:
    """KubeVirt-like crash-loop backoff: 10 s, 20 s, 40 s, … capped at 5 min."""
    return min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** max(0, consecutive_failures - 1))


def record_start_failure(previous: StartFailure | None, now: dt.datetime,
                         last_start: dt.datetime | None = None) -> StartFailure:
    """One more failure: the counter grows unless the last run was stable (then it restarts at 1)."""
    count = previous.consecutive_fail_count if previous else 0
    if last_start is not None and (now - last_start).total_seconds() >= STABLE_RUN_SECONDS:
        count = 0
    count += 1
    return StartFailure(consecutive_fail_count=count,
                        retry_after=now + dt.timedelta(seconds=start_backoff(count)))


def crash_looping_stalled(failure: StartFailure | None) -> bool:
    """Failed often enough in a row to report Stalled=True (and no longer Reconciling) while retrying."""
    return failure is not None and failure.consecutive_fail_count >= STALLED_AFTER_FAILURES


def _failed(observed: DomainObservation, stop_requested: bool) -> bool:
    if observed.state is PowerState.CRASHED:
        return True
    if stop_requested:
        return False
    return observed.state is PowerState.SHUTOFF and observed.stop_cause in (StopCause.FAILURE, StopCause.DESTROYED)


def desired_running(run_strategy: str, observed: DomainObservation, power: PowerStatus) -> bool | None:
    """True: should run; False: should be off; None: leave the power state alone."""
    never_started = power.first_boot_time is None
    running = observed.state in (PowerState.RUNNING, PowerState.PAUSED, PowerState.SHUTTING_DOWN)
    if run_strategy == "Always":
        return True
    if run_strategy == "Halted":
        return False
    if run_strategy == "Manual":
        return True if never_started else None
    if run_strategy == "Once":
        return True if never_started or running else False
    if run_strategy == "RerunOnFailure":
        if never_started or running:
            return True
        return _failed(observed, power.stop_requested_time is not None)
    raise ValueError(f"unknown runStrategy {run_strategy!r}")


def plan_power(run_strategy: str, observed: DomainObservation, power: PowerStatus, now: dt.datetime,
               grace_seconds: float = 60.0) -> PowerPlan:
    """Next power action and the power part of the status, from the runStrategy, what libvirt
    reports and what the status remembers. `observed` must describe a defined domain
    (ABSENT counts as off: the caller defines the domain first)."""
    state = observed.state
    requeue: list[float] = []

    # 1. Bookkeeping of what happened since the last look.
    first_boot, last_start, stop_req, failure = (power.first_boot_time, power.last_start_time,
                                                 power.stop_requested_time, power.start_failure)
    off = state in (PowerState.SHUTOFF, PowerState.ABSENT, PowerState.CRASHED)
    if state is PowerState.RUNNING:
        first_boot = first_boot or now
        last_start = last_start or now
        if failure is not None:
            ran = (now - last_start).total_seconds()
            if ran >= STABLE_RUN_SECONDS:
                failure = None
            else:
                requeue.append(STABLE_RUN_SECONDS - ran)
    if off and last_start is not None:
        # A run ended: count it as a failure or not (exactly once: last_start is cleared).
        if (now - last_start).total_seconds() >= STABLE_RUN_SECONDS:
            failure = None  # a failure after a stable run is not a crash loop: no backoff
        elif _failed(observed, stop_req is not None):
            failure = record_start_failure(failure, now, last_start)
        last_start = None
    if off:
        stop_req = None

    bookkept = PowerStatus(first_boot, last_start, stop_req, failure)
    want = desired_running(run_strategy, observed, bookkept)

    def plan(action: Action, printable: str, ready: bool, reason: str, message: str,
             status: PowerStatus = bookkept) -> PowerPlan:
        return PowerPlan(action, want, status, printable, ready, reason, message,
                         min(requeue) if requeue else None)

    if state is PowerState.UNKNOWN:
        return plan(Action.NONE, "Unknown", False, "Unknown", "libvirt reports an unknown domain state")

    if want is None:  # Manual after the first start: report, never act
        if state is PowerState.RUNNING:
            return plan(Action.NONE, "Running", True, "Running", "the domain is running")
        if state is PowerState.PAUSED:
            return plan(Action.NONE, "Paused", True, "Paused", "the domain is paused (runStrategy Manual)")
        if state is PowerState.SHUTTING_DOWN:
            return plan(Action.NONE, "Stopping", True, "Stopping", "the guest is shutting down")
        return plan(Action.NONE, "Stopped", True, "Stopped", "the domain is stopped (runStrategy Manual)")

    if want:
        if state is PowerState.RUNNING:
            return plan(Action.NONE, "Running", True, "Running", "the domain is running")
        if state is PowerState.PAUSED:
            return plan(Action.NONE, "Paused", False, "Paused", "the domain is paused")
        if state is PowerState.SHUTTING_DOWN:
            requeue.append(1.0)
            return plan(Action.NONE, "Stopping", False, "Stopping", "the guest is shutting down; it will be restarted")
        if state is PowerState.CRASHED:
            return plan(Action.DESTROY, "CrashLoopBackOff", False, "CrashLoopBackOff",
                        "the domain crashed; powering it off before a restart")
        if failure is not None and failure.retry_after is not None and failure.retry_after > now:
            wait = (failure.retry_after - now).total_seconds()
            requeue.append(wait)
            return plan(Action.NONE, "CrashLoopBackOff", False, "CrashLoopBackOff",
                        f"the domain failed {failure.consecutive_fail_count} time(s) in a row; next start at "
                        f"{timestamp(failure.retry_after)}")
        return plan(Action.START, "Starting", False, "Starting", "starting the domain")

    # want is False
    if off:
        if run_strategy == "Halted":
            message = "the domain is stopped (runStrategy Halted)"
        elif run_strategy == "Once":
            message = "the domain ran once and stopped (runStrategy Once)"
        else:
            message = "the guest shut down cleanly (runStrategy RerunOnFailure)"
        # Stopped on purpose: a crash-loop record no longer applies.
        return plan(Action.NONE, "Stopped", True, "Stopped", message,
                    dataclasses.replace(bookkept, start_failure=None))
    if state is PowerState.PAUSED or grace_seconds <= 0:
        return plan(Action.DESTROY, "Stopping", False, "Stopping", "powering the domain off",
                    dataclasses.replace(bookkept, stop_requested_time=stop_req or now))
    if stop_req is None:
        requeue.append(grace_seconds)
        return plan(Action.SHUTDOWN, "Stopping", False, "Stopping", "asking the guest to shut down",
                    dataclasses.replace(bookkept, stop_requested_time=now))
    waited = (now - stop_req).total_seconds()
    if waited >= grace_seconds:
        return plan(Action.DESTROY, "Stopping", False, "Stopping",
                    f"the guest did not shut down within {grace_seconds:.0f}s; powering it off")
    requeue.append(grace_seconds - waited)
    return plan(Action.NONE, "Stopping", False, "Stopping",
                f"waiting up to {grace_seconds:.0f}s for the guest to shut down; then it is powered off")


def eject_media_now(install_media_policy: str, first_boot_time: dt.datetime | None, media_ejected: bool,
                    observed: DomainObservation) -> bool:
    """EjectAfterFirstBoot: empty the cdroms once the first run has ended (the domain is off after
    having booted). Never while it runs: an installer still reads its media."""
    return (install_media_policy == "EjectAfterFirstBoot" and not media_ejected and first_boot_time is not None
            and observed.state in (PowerState.SHUTOFF, PowerState.CRASHED))


def printable_status(*, deleting: bool = False, unschedulable: bool = False, waiting_for_media: bool = False,
                     provisioning: bool = False, host_unknown: bool = False,
                     power: PowerPlan | None = None) -> str:
    """One word for humans, in priority order."""
    if deleting:
        return "Terminating"
    if unschedulable:
        return "ErrorUnschedulable"
    if waiting_for_media:
        return "WaitingForMedia"
    if host_unknown:
        return "Unknown"
    if provisioning or power is None:
        return "Provisioning"
    return power.printable

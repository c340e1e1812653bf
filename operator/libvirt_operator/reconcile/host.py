"""LibvirtHost: connect, probe, report. The probe also refreshes the connection pool entry."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, overload

from ..adapters.libvirt import ConnectOptions, HostConnection
from ..adapters.libvirt.host_facts import HostFacts, probe_host
from ..core import hosturi
from ..core.api.host import LibvirtHostSpec
from ..core.conditions import set_condition, summarize
from ..core.errors import AppError, ErrorCode
from ..core.quantity import format_bytes
from ..core.timestamps import timestamp
from .failures import error_status, human_message
from .runtime import Runtime

REACHABLE = "Reachable"
_UNREACHABLE_CODES = {ErrorCode.HOST_UNREACHABLE, ErrorCode.HOST_AUTH_FAILED, ErrorCode.LIBVIRT_TIMEOUT,
                      ErrorCode.CREDENTIALS_NOT_FOUND}


@dataclasses.dataclass
class HostOutcome:
    status: dict[str, Any]
    error: AppError | None
    facts: HostFacts | None


async def connect_options(spec: LibvirtHostSpec, rt: Runtime) -> ConnectOptions:
    try:  # authoritative: the CRD's CEL rules say the same, but not the operator's own settings
        parsed = hosturi.parse(spec.uri)
        hosturi.check_policy(parsed, insecure=spec.insecure, allow_test_driver=rt.settings.allow_test_driver,
                             test_driver_dirs=rt.settings.test_driver_dirs)
    except hosturi.HostUriError as err:
        raise AppError(ErrorCode.INVALID_SPEC, f"invalid LibvirtHost spec: uri refused: {err}", {"field": "spec.uri"}) from None
    credentials: dict[str, bytes] = {}
    ref = spec.credentials_secret_ref
    needed = hosturi.secret_keys(parsed)
    if ref is not None:
        data = await rt.kube.read_secret(ref.namespace, ref.name)
        if data is None:
            raise AppError(ErrorCode.CREDENTIALS_NOT_FOUND,
                           f"Secret {ref.namespace}/{ref.name} named by credentialsSecretRef does not exist",
                           {"secretRef": f"{ref.namespace}/{ref.name}"})
        credentials = data
        missing = hosturi.missing_keys_message(f"{ref.namespace}/{ref.name}", needed, list(data)) if needed else None
        if missing:
            raise AppError(ErrorCode.CREDENTIALS_NOT_FOUND, missing, {"secretRef": f"{ref.namespace}/{ref.name}"})
    elif needed is not None and parsed.ssh:
        raise AppError(ErrorCode.CREDENTIALS_NOT_FOUND,
                       f"credentialsSecretRef is missing: {parsed.scheme}:// needs a Secret with keys "
                       f"{', '.join(needed.required)} (the operator checks {parsed.endpoint}'s host key "
                       "against known_hosts, always)", {})
    return ConnectOptions(uri=spec.uri, max_concurrent_calls=spec.max_concurrent_calls,
                          credentials=credentials, call_timeout=rt.settings.libvirt_call_timeout,
                          connect_timeout=rt.settings.connect_timeout)


@overload
async def host_connection(rt: Runtime, name: str, spec: LibvirtHostSpec | Mapping[str, Any]) -> HostConnection: ...
@overload
async def host_connection(rt: Runtime, name: str, spec: None) -> HostConnection | None: ...


async def host_connection(rt: Runtime, name: str, spec: LibvirtHostSpec | Mapping[str, Any] | None
                          ) -> HostConnection | None:
    """The one way to a host's pooled connection (VMs, ISOImages; no Secret read per call when pooled).
    The probe keeps the pool entry's options current (it re-reads the spec and Secret each round); others take the pooled one as it
    is, and open it here with the same options only when there is none yet (e.g. right after a
    restart, before the first probe). None: no pooled connection and no spec to open one."""
    conn = rt.pool.get(name)
    if (conn is not None and not conn.closed) or spec is None:
        return conn
    if not isinstance(spec, LibvirtHostSpec):
        spec = LibvirtHostSpec.model_validate(spec.get("spec") or {})
    return await rt.pool.ensure(name, await connect_options(spec, rt))


def status_from_facts(facts: HostFacts, conditions: list[dict[str, Any]], generation: int) -> dict[str, Any]:
    conditions = set_condition(conditions, REACHABLE, True, "Connected", "libvirt answered the probe", generation)
    conditions = summarize(conditions, ready=True, reason="HostReady",
                           message=f"{facts.hypervisor} on {facts.hostname}, {facts.cpus} CPUs, "
                                   f"{format_bytes(facts.memory_bytes)}",
                           generation=generation)
    return {
        "observedGeneration": generation,
        "conditions": conditions,
        "hostname": facts.hostname,
        "arch": facts.arch,
        "hypervisor": facts.hypervisor,
        "libvirtVersion": facts.libvirt_version,
        "domainTypes": list(facts.domain_types),
        "capacity": {"cpus": facts.cpus, "memory": format_bytes(facts.memory_bytes)},
        "allocated": {"cpus": facts.allocated_cpus, "memory": format_bytes(facts.allocated_memory_bytes)},
        "domains": facts.domains,
        "lastProbeTime": timestamp(),
    }


async def failure_outcome(err: AppError, status: dict[str, Any], generation: int, rt: Runtime) -> HostOutcome:
    """NotReady (and Reachable=False for unreachable codes) with err in status.error; facts kept."""
    conditions = list(status.get("conditions") or [])
    err_status = await error_status(err, status.get("error"), "LibvirtHost", rt.remediator)
    message = human_message(err, err_status)
    reachable = err.code not in _UNREACHABLE_CODES
    conditions = set_condition(conditions, REACHABLE, reachable, "Connected" if reachable else err.reason,
                               message, generation)
    conditions = summarize(conditions, ready=False, reason=err.reason, message=message,
                           generation=generation, stalled=not err.retryable, reconciling=err.retryable)
    new = {k: v for k, v in status.items() if k in ("capacity", "hostname", "arch", "hypervisor",
                                                     "libvirtVersion", "domainTypes", "orphanedDomains")}
    new.update({"observedGeneration": generation, "conditions": conditions, "error": err_status,
                "lastProbeTime": timestamp()})
    return HostOutcome(new, err, None)


async def connection_lost(name: str, reason: str, status: dict[str, Any] | None, generation: int,
                          rt: Runtime) -> HostOutcome:
    """The host's connection dropped (libvirt's close callback: EOF, keepalive): NotReady now, not at
    the next probe."""
    err = AppError(ErrorCode.HOST_UNREACHABLE, reason, {"host": name, "operation": "connection"})
    return await failure_outcome(err, dict(status or {}), generation, rt)


async def reconcile_host(name: str, spec_body: dict[str, Any], status: dict[str, Any] | None,
                         generation: int, rt: Runtime) -> HostOutcome:
    status = dict(status or {})
    conditions = list(status.get("conditions") or [])
    try:
        spec = LibvirtHostSpec.model_validate(spec_body)
        options = await connect_options(spec, rt)
        conn = await rt.pool.ensure(name, options)
        facts = await conn.call("probe", probe_host, timeout=rt.settings.connect_timeout)
    except AppError as err:
        return await failure_outcome(err, status, generation, rt)
    new = status_from_facts(facts, conditions, generation)
    if status.get("orphanedDomains"):
        new["orphanedDomains"] = status["orphanedDomains"]  # owned by the VM controller's resync
    return HostOutcome(new, None, facts)

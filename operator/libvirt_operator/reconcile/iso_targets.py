"""ISOImage targets: the Ready LibvirtHosts an image goes to (its hostSelector, each host's tenancy),
with the pool each one's volume lives in."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..core.api.host import LibvirtHostSpec
from ..core.api.iso import ISOImageSpec
from ..core.conditions import READY, is_true
from ..core.errors import AppError, ErrorCode
from ..core.labels import labels_match
from . import plan
from .runtime import Runtime
from .tenancy import namespace_labels_of
from .iso_status import KIND


@dataclasses.dataclass
class Target:
    host: str
    pool: str
    spec: LibvirtHostSpec | None
    problem: AppError | None = None  # named explicitly but missing or not Ready


async def resolve_targets(spec: ISOImageSpec, rt: Runtime, namespace: str = "",
                          hosts: Mapping[str, Mapping[str, Any]] | None = None) -> list[Target]:
    """The hosts to import onto, with their pools. Tenancy (LibvirtHost allowedNamespaces,
    namespaceSelector, allowedPools): a named host that refuses the image's namespace or pool is a
    target with a problem; selected hosts that refuse it are skipped. `hosts`: the watch-fed view
    (handlers.iso's index); listed from the apiserver only without one."""
    if hosts is None:
        hosts = {h["metadata"]["name"]: h for h in await rt.kube.list_objects("libvirthosts")}
    views = {n: plan.HostView.from_object(h) for n, h in hosts.items()}
    ns_labels = (await namespace_labels_of(rt).get(namespace)
                 if namespace and plan.needs_namespace_labels(views.values(), namespace) else None)
    refused: list[AppError] = []

    def refusal(t: Target) -> AppError | None:
        return plan.image_denial(views[t.host], namespace, ns_labels, t.pool)

    targets = spec.targets
    names = list(targets.host_names) if targets else []
    selector = dict(targets.host_selector.match_labels) if targets and targets.host_selector else None
    chosen: dict[str, Target] = {}

    def ready(obj: dict[str, Any]) -> bool:
        return is_true((obj.get("status") or {}).get("conditions"), READY)

    def target(name: str, obj: dict[str, Any]) -> Target:
        host_spec = LibvirtHostSpec.model_validate(obj.get("spec") or {})
        return Target(name, spec.pool or host_spec.default_pool, host_spec)

    for name in names:
        obj = hosts.get(name)
        if obj is None:
            chosen[name] = Target(name, spec.pool or "default", None, AppError(
                ErrorCode.HOST_NOT_FOUND, f"LibvirtHost {name} named in spec.targets.hostNames does not exist",
                {"host": name}))
        elif (denied := refusal(t := target(name, obj))) is not None:
            t.problem = denied
            chosen[name] = t
        elif not ready(obj):
            t.problem = AppError(ErrorCode.HOST_UNREACHABLE, f"LibvirtHost {name} is not Ready", {"host": name})
            chosen[name] = t
        else:
            chosen[name] = target(name, obj)
    if selector is not None or not names:
        for name, obj in hosts.items():
            labels = (obj.get("metadata") or {}).get("labels") or {}
            if name in chosen or not ready(obj):
                continue
            if selector is None or labels_match(selector, labels):
                if (denied := refusal(t := target(name, obj))) is not None:
                    refused.append(denied)
                else:
                    chosen[name] = t
    if not chosen:
        if refused:
            raise AppError(refused[0].code, f"no Ready LibvirtHost matching the ISOImage's targets admits it "
                           f"({len(refused)} refuse it); e.g. {refused[0].message}", refused[0].context)
        raise AppError(ErrorCode.NO_SCHEDULABLE_HOST,
                       "no Ready LibvirtHost matches the ISOImage's targets", {"kind": KIND})
    return [chosen[n] for n in sorted(chosen)]

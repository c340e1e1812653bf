"""Pure tenancy: which namespaces a host admits, and which pools / networks / bridges it exposes
(LibvirtHost tenancy fields); a denial is an AppError that says what to change."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..core.api.vm import VirtualMachineSpec
from ..core.errors import AppError, ErrorCode
from .plan_hosts import HostView


def admits_namespace(host: HostView, namespace: str, namespace_labels: Mapping[str, str] | None) -> bool:
    """Neither allowedNamespaces nor namespaceSelector set: every namespace (back-compat). Else the
    namespace must be listed or its labels match the selector. Unknown labels (None) match no selector."""
    if not host.restricts_namespaces:
        return True
    if host.allowed_namespaces is not None and namespace in host.allowed_namespaces:
        return True
    return (host.namespace_selector is not None and namespace_labels is not None
            and host.namespace_selector.matches(namespace_labels))


def pools_of(spec: VirtualMachineSpec, host: HostView) -> list[str]:
    """The storage pools the VM's new volumes go to on this host, and those its base images are in."""
    pools = {d.volume.pool or host.default_pool for d in spec.disks if d.volume is not None}
    pools.update(d.volume.source.volume.pool for d in spec.disks if d.volume is not None and d.volume.source)
    return sorted(pools)


def pool_allowed(host: HostView, pool: str) -> bool:
    """allowedPools unset: any pool; set: those and defaultPool."""
    return host.allowed_pools is None or pool == host.default_pool or pool in host.allowed_pools


def _listed(allowed: frozenset[str] | None) -> str:
    return ", ".join(sorted(allowed)) if allowed else "none"


def namespace_denial(host: HostView, namespace: str, namespace_labels: Mapping[str, str] | None) -> AppError | None:
    if admits_namespace(host, namespace, namespace_labels):
        return None
    how = []
    if host.allowed_namespaces is not None:
        how.append(f"allowedNamespaces: {_listed(host.allowed_namespaces)}")
    if host.namespace_selector is not None:
        how.append("namespaceSelector does not match the namespace's labels")
    return AppError(ErrorCode.NAMESPACE_NOT_ALLOWED,
                    f"LibvirtHost {host.name} does not admit namespace {namespace} ({'; '.join(how)})",
                    {"host": host.name, "namespace": namespace})


def pool_denial(host: HostView, pool: str, namespace: str, what: str = "VMs") -> AppError | None:
    if pool_allowed(host, pool):
        return None
    return AppError(ErrorCode.POOL_NOT_ALLOWED,
                    f"LibvirtHost {host.name} does not expose storage pool {pool} to {what} (allowedPools: "
                    f"{_listed(host.allowed_pools)}; defaultPool {host.default_pool} is always allowed)",
                    {"host": host.name, "pool": pool, "namespace": namespace})


def host_denial(spec: VirtualMachineSpec, host: HostView, namespace: str,
                namespace_labels: Mapping[str, str] | None) -> AppError | None:
    """Why this host refuses this VM (namespace first, then pools, networks, bridges), or None."""
    denial = namespace_denial(host, namespace, namespace_labels)
    if denial is not None:
        return denial
    for pool in pools_of(spec, host):
        denial = pool_denial(host, pool, namespace)
        if denial is not None:
            return denial
    for iface in spec.interfaces:
        allowed = {"network": host.allowed_networks, "bridge": host.allowed_bridges}.get(iface.type)
        if allowed is not None and iface.source not in allowed:
            field = "allowedNetworks" if iface.type == "network" else "allowedBridges"
            return AppError(ErrorCode.NETWORK_NOT_ALLOWED,
                            f"LibvirtHost {host.name} does not expose {iface.type} {iface.source} (interface "
                            f"{iface.name}) to VMs ({field}: {_listed(allowed)})",
                            {"host": host.name, iface.type: iface.source or "", "interface": iface.name,
                             "namespace": namespace})
    return None


def image_denial(host: HostView, namespace: str, namespace_labels: Mapping[str, str] | None,
                 pool: str) -> AppError | None:
    """Why this host refuses an ISOImage of this namespace into this pool, or None."""
    return namespace_denial(host, namespace, namespace_labels) or pool_denial(host, pool, namespace, "ISOImages")


def needs_namespace_labels(hosts: Iterable[HostView], namespace: str) -> bool:
    """Whether deciding on these hosts reads the namespace's labels (a selector that a listing
    does not already settle)."""
    return any(h.namespace_selector is not None and not (h.allowed_namespaces and namespace in h.allowed_namespaces)
               for h in hosts)

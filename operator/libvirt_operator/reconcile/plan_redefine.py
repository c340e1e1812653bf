"""Pure: the domain's definition: its type (kvm/qemu) and whether to (re)define it or restart it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from ..core.errors import AppError, ErrorCode


def domain_type_for(requested: str, host_domain_types: Iterable[str], previous: str | None = None) -> str:
    """kvm/qemu for a spec's domainType. auto: kvm when the host offers it, else qemu; once chosen
    (status.domainType) auto keeps its choice so a host probe never flips a VM's type."""
    if requested in ("kvm", "qemu"):
        types = tuple(host_domain_types)
        if requested == "kvm" and types and "kvm" not in types:
            raise AppError(ErrorCode.HYPERVISOR_UNSUPPORTED,
                           "domainType kvm requested but the host offers no usable KVM "
                           f"(domain types: {', '.join(types)})", {"domainType": requested})
        return requested
    if previous in ("kvm", "qemu"):
        return previous
    return "kvm" if "kvm" in host_domain_types else "qemu"


@dataclasses.dataclass(frozen=True)
class RedefinePlan:
    define: bool            # (re)define the persistent domain
    restart_required: bool  # the running domain still uses an older definition


def plan_redefine(desired_hash: str, defined_hash: str | None, live_hash: str | None,
                  active: bool) -> RedefinePlan:
    """defined_hash: from the persistent (inactive) XML, None when absent or not ours;
    live_hash: from the running XML (None when not running). libvirt applies a new persistent
    definition at the next boot, so a running domain with another definition needs a restart."""
    define = defined_hash != desired_hash
    restart = active and live_hash is not None and live_hash != desired_hash
    return RedefinePlan(define, restart)

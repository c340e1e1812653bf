"""A VM's cloud-init seed on its host: read the user data (spec or Secret), plan the seed
(reconcile.cloudinit), upload it when new (adapters.libvirt.seed) and give the cdrom to attach.

The user data from a Secret goes into the seed and nowhere else: not into status, events, logs or
error messages (those name the Secret and key only)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..adapters.libvirt import seed as seed_adapter
from ..core.api.vm import VirtualMachineSpec
from ..core.domain import DiskDefinition
from ..core.errors import AppError, ErrorCode
from ..core.logs import get_logger
from . import cloudinit, plan
from .runtime import Runtime

log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class AttachedSeed:
    disk: DiskDefinition           # the read-only cdrom
    volume: dict[str, str]         # its status.volumes entry
    uploaded: bool


async def _user_data(spec: VirtualMachineSpec, namespace: str, rt: Runtime) -> bytes | None:
    ci = spec.cloud_init
    assert ci is not None
    if ci.user_data_secret_ref is None:
        return ci.user_data.encode() if ci.user_data is not None else None
    ref = ci.user_data_secret_ref
    where = f"Secret {namespace}/{ref.name} named by spec.cloudInit.userDataSecretRef"
    context = {"secret": f"{namespace}/{ref.name}", "key": ref.key, "field": "spec.cloudInit.userDataSecretRef"}
    data = await rt.kube.read_secret(namespace, ref.name) if rt.kube is not None else None
    if data is None or ref.key not in data:
        raise AppError(ErrorCode.CREDENTIALS_NOT_FOUND, f"{where} is missing or has no key {ref.key}", context)
    value = data[ref.key]
    if len(value) > cloudinit.MAX_SECRET_USER_DATA:
        raise AppError(ErrorCode.INVALID_SPEC, f"{where}: key {ref.key} holds {len(value)} bytes, more than the "
                                               f"{cloudinit.MAX_SECRET_USER_DATA} a cloud-init seed may hold", context)
    return value


async def attach_seed(spec: VirtualMachineSpec, namespace: str, name: str, uid: str, hv: plan.HostView,
                      conn: Any, rt: Runtime) -> AttachedSeed | None:
    """The seed cdrom for this VM (uploaded to the host's defaultPool when its content is new), or None
    without spec.cloudInit. Older seeds of the VM that no running domain uses are deleted."""
    if spec.cloud_init is None:
        return None
    network = spec.cloud_init.network_data
    seed = cloudinit.plan_seed(uid, name, await _user_data(spec, namespace, rt),
                               network.encode() if network is not None else None)
    pool = hv.default_pool
    path, uploaded = await seed_adapter.ensure_seed(conn, pool, seed.volume, seed.files)
    try:
        pruned = await conn.call("prune_seeds", lambda c: seed_adapter.prune_seeds_blocking(
            c, uid, pool, seed.volume, lambda v: cloudinit.is_seed_volume(uid, v)))
        if pruned:
            log.info("older cloud-init seeds deleted", volumes=pruned)
    except AppError as err:  # housekeeping only: teardown deletes them with the VM anyway
        log.info("older cloud-init seeds not pruned", code=err.code.value)
    disk = DiskDefinition(cloudinit.SEED_DISK, "cdrom", path, "raw", None, pool, seed.volume)
    return AttachedSeed(disk, {"disk": cloudinit.SEED_DISK, "pool": pool, "name": seed.volume}, uploaded)

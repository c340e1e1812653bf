"""ISOImage deletion: refused while a VirtualMachine references the image; otherwise the image's
volumes are removed from every host and the cache file with them."""

from __future__ import annotations

from typing import Any

from ..adapters.libvirt.volumes import delete_volume, is_volume_of
from ..core.api.host import LibvirtHostSpec
from ..core.conditions import summarize
from ..core.errors import AppError, ErrorCode
from ..core.logs import get_logger
from .failures import error_status, human_message
from .host import host_connection
from .runtime import Runtime
from .iso_cache import remove_cache
from .iso_status import KIND

log = get_logger(__name__)


async def referencing_vms(namespace: str, name: str, rt: Runtime) -> list[str]:
    users = []
    for vm in await rt.kube.list_objects("virtualmachines", namespace):
        for disk in (vm.get("spec") or {}).get("disks") or []:
            ref = ((disk or {}).get("cdrom") or {}).get("isoImageRef") or {}
            if ref.get("name") == name:
                users.append(vm["metadata"]["name"])
                break
    return sorted(users)


async def delete_iso(namespace: str, name: str, uid: str, status: dict[str, Any] | None, rt: Runtime,
                     *, force: bool = False) -> None:
    """Remove the volumes and the cache file; AppError(ISO_IN_USE) while a VM references the image.

    Only volumes whose names are this ISOImage's own (`is_volume_of`: derived from its namespace and
    name) are deleted: status lists where the image went, but a volume name written into status by
    someone else never makes another image's or tenant's volume a deletion target."""
    users = await referencing_vms(namespace, name, rt)
    if users:
        raise AppError(ErrorCode.ISO_IN_USE,
                       f"ISOImage {name} is used by VirtualMachine {', '.join(users[:5])}"
                       f"{' and others' if len(users) > 5 else ''}; remove the cdrom first",
                       {"virtualMachines": ",".join(users)[:200]})
    hosts = {h["metadata"]["name"]: h for h in await rt.kube.list_objects("libvirthosts")}
    errors: list[AppError] = []
    for entry in (status or {}).get("hosts") or []:
        host, pool, vol = entry.get("host"), entry.get("pool"), entry.get("volume")
        if not (host and pool and vol):
            continue
        if not is_volume_of(namespace, name, vol):
            log.warning("status names a volume that is not this ISOImage's: left in place", host=host,
                        pool=pool, volume=vol)
            continue
        obj = hosts.get(host)
        if obj is None:
            log.warning("host gone, volume left in place", host=host, pool=pool, volume=vol)
            continue
        try:
            conn = await host_connection(rt, host, LibvirtHostSpec.model_validate(obj.get("spec") or {}))
            deleted = await delete_volume(conn, pool, vol)
            log.info("volume deleted" if deleted else "volume already gone", host=host, pool=pool, volume=vol)
        except AppError as err:
            errors.append(err)
    if errors and not force:
        raise errors[0]
    remove_cache(rt, uid)


async def deletion_blocked_status(err: AppError, status: dict[str, Any] | None, generation: int,
                                  rt: Runtime) -> dict[str, Any]:
    status = dict(status or {})
    err_status = await error_status(err, status.get("error"), KIND, rt.remediator)
    message = human_message(err, err_status)
    new = dict(status)
    new.update({"phase": "Deleting", "error": err_status, "conditions": summarize(
        list(status.get("conditions") or []), ready=False, reason=err.reason, message=message,
        generation=generation, reconciling=True)})
    return new

"""The operator's side of a live migration (blocking, on the source host's thread): which disks are
copied and which are mapped, where the data flows, and libvirt's failures as AppErrors. The libvirt
mechanics are in .migration."""

from __future__ import annotations

import ipaddress
import threading
import urllib.parse
from collections.abc import Callable, Mapping

import libvirt

from ...core.errors import AppError, ErrorCode
from . import migration
from .domain_xml import disk_devices


def migration_addresses(target_uri: str) -> tuple[str | None, str | None]:
    """Where the source QEMU sends the data (tcp://<the target URI's host>) and, for an IP literal, the
    address the target's QEMU listens on (only there, not on every address)."""
    host = urllib.parse.urlsplit(target_uri).hostname
    if not host:
        return None, None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"tcp://{host}", None
    shown = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"tcp://{shown}", str(ip)


def plan_copies(sc: libvirt.virConnect, uid: str, paths_by_disk: Mapping[str, str],
                shared_pools: frozenset[str]) -> tuple[list[migration.DiskCopy], dict[str, str]]:
    """From the running domain: each writable disk is copied into the same-named pool on the target;
    each read-only one (ISO, cloud-init seed) is mapped to its path on the target (`paths_by_disk`,
    by the spec's disk name). A disk in a shared pool is refused (both hosts see the same file)."""
    xml = sc.lookupByUUIDString(uid).XMLDesc(0)
    copies: list[migration.DiskCopy] = []
    readonly: dict[str, str] = {}
    for name, (dev, path, ro) in disk_devices(xml).items():
        if not path:
            continue
        if ro:
            if name not in paths_by_disk:
                raise AppError(ErrorCode.MIGRATION_FAILED, f"disk {name} has no counterpart on the target host")
            readonly[dev] = paths_by_disk[name]
            continue
        pool = sc.storageVolLookupByPath(path).storagePoolLookupByVolume().name()
        if pool in shared_pools:
            raise AppError(ErrorCode.MIGRATION_FAILED,
                           f"disk {name} lives in shared pool {pool}: live migration on shared storage is not "
                           "supported yet (only host-local qcow2 volumes are copied)", {"disk": name, "pool": pool})
        copies.append(migration.DiskCopy(dev, pool))
    return copies, readonly


def run(sc: libvirt.virConnect, dc: libvirt.virConnect, uid: str, target_uri: str, paths_by_disk: Mapping[str, str],
        shared_pools: frozenset[str], *, bandwidth_mib: int | None, timeout: float,
        on_progress: Callable[[migration.MigrationProgress], None], cancel: threading.Event
        ) -> migration.MigrationResult:
    """Blocking (the source host's thread): plan the disks and migrate; libvirt failures become AppErrors."""
    copies, readonly = plan_copies(sc, uid, paths_by_disk, shared_pools)
    data_uri, listen = migration_addresses(target_uri)
    try:
        return migration.migrate_live(sc, dc, uid, target_uri, copy_disks=copies, readonly_paths=readonly,
                                      migration_uri=data_uri, listen_address=listen, bandwidth_mib=bandwidth_mib,
                                      timeout=timeout, on_progress=on_progress, cancel=cancel)
    except migration.MigrationError as err:
        left = f"; left on the target: {', '.join(err.left_on_destination)}" if err.left_on_destination else ""
        context = {"libvirtCode": str(err.libvirt_code or "")}
        if err.left_on_destination:
            context["leftOnTarget"] = ",".join(err.left_on_destination)
        raise AppError(ErrorCode.MIGRATION_FAILED,
                       f"{'aborted' if err.aborted else 'failed'}: {err}{left}; the VM keeps running on its host",
                       context) from err
    except (ValueError, libvirt.libvirtError) as err:
        raise AppError(ErrorCode.MIGRATION_FAILED, f"refused before copying: {err}; the VM keeps running on its host"
                       ) from err

"""Live migration of a running domain to another libvirt host, shared-nothing (blocking; run it off
the event loop, e.g. through ``HostConnection.call`` of the source host).

What :func:`migrate_live` does, in order:

1. Reads the running domain's migratable XML on the source and checks the plan covers every disk:
   each writable file disk must be copied (:class:`DiskCopy`: destination pool and volume name),
   each read-only disk with a source (the cdrom ISO) must be mapped to a path that already exists
   on the destination (``readonly_paths``; it is not copied). Shared storage is not handled here.
2. Pre-creates the destination volumes itself (same name, capacity and format as the source
   volume, allocation 0) and refuses if one exists already (it is not ours to overwrite or delete).
3. ``virDomain.migrateToURI3(dest_uri, params, flags)`` with ``MIGRATION_FLAGS`` (LIVE | PEER2PEER |
   PERSIST_DEST | UNDEFINE_SOURCE | NON_SHARED_DISK) and the params DEST_XML (disk sources rewritten
   with ElementTree for the destination), MIGRATE_DISKS (the copied target devs), URI (the address
   the source QEMU connects to, ``tcp://127.0.0.1`` on one machine) and optionally LISTEN_ADDRESS and
   BANDWIDTH (MiB/s). The call runs in a helper thread; the caller's thread polls ``jobStats()``
   (:func:`read_progress`, handed to ``on_progress``), and aborts (``abortJob()``) on ``timeout`` or
   when ``cancel`` is set. :func:`abort_migration` does the same from anywhere else.
4. On failure, deletes the volumes it pre-created on the destination (only those; a destination
   that is gone keeps them: ``MigrationError.left_on_destination``), and raises
   :class:`MigrationError` with libvirt's error. On success the domain runs (and is defined) on the
   destination only; the source volumes stay on the source for the caller to delete.

Facts measured here (libvirt 9.0, QEMU 7.2 TCG, two ``LibvirtDaemon`` hosts on one machine,
64 MiB guest with a 16 MiB qcow2 disk and an 0.8 MB ISO cdrom; loopback, 2 busy cores):

- Daemons on one machine share the host UUID (SMBIOS / machine-id) and libvirt refuses with
  "Attempt to migrate guest to the same host": each ``LibvirtDaemon`` sets its own ``host_uuid``.
- PEER2PEER: the source libvirtd opens its own connection to ``dest_uri`` (the URI must be
  reachable *from the source daemon*, with its credentials), the client talks to the source only.
  Without UNDEFINE_SOURCE the source keeps a shut-off definition; without PERSIST_DEST the
  destination's domain is transient. NON_SHARED_DISK + MIGRATE_DISKS: the destination QEMU serves
  NBD and the source mirrors the listed disks into it before the memory is sent.
- Ports: the destination QEMU listens on the first free ports of libvirt's ``migration_port_min``..
  ``max`` range (qemu.conf, default 49152-49215): 49152 and 49153 (the migration stream and the
  NBD server), for the duration of the job only. Without LISTEN_ADDRESS both listen on all
  addresses (``*:49152``); with LISTEN_ADDRESS=127.0.0.1 both listen on ``127.0.0.1`` only (seen
  with ``ss``). libvirtd's own port (``dest_uri``) carries the control traffic (source daemon ->
  destination daemon); the client only talks to the source daemon.
- Duration: 2.0-3.7 s for the guest above, from the call to its return (the guest resumed on the
  destination), of which 0.9-1.5 s is the destination's own job time and 70-320 ms the downtime
  (completed-job stats on the destination; the spread is the shared machine's load); the guest's
  once-a-second counter never skipped.
  BANDWIDTH (MiB/s) applies to the disk copy and the memory: 4 MiB/s made it ~7 s, 2 MiB/s ~11 s.
- libvirt can pre-create the destination disk itself (when the rewritten path lies in a started
  pool's directory, found by target path) but leaves it behind when the migration fails; a path in
  no pool fails at once with VIR_ERR_NO_STORAGE_POOL "Storage pool not found: no storage pool with
  matching target path '...'". Hence the explicit pre-creation and cleanup here.
- Destination lacks the ISO: fails in ~0.06 s (Prepare, before any copy) with VIR_ERR_SYSTEM_ERROR
  from VIR_FROM_STORAGE, "Cannot access storage file '<path>': No such file or directory"; the
  domain keeps running on the source, nothing is defined on the destination.
- Destination libvirtd killed mid-migration (its QEMU alive or not): fails within ~0.05 s with
  VIR_ERR_INTERNAL_ERROR from VIR_FROM_RPC "internal error: client socket is closed"; the source
  domain keeps running. The restarted destination daemon kills the half-received QEMU ("shutting
  down, reason=daemon") and has no definition; the pre-created volume stays (unreachable when the
  cleanup ran). Destination QEMU killed alone: fails after ~5-6 s with VIR_ERR_INTERNAL_ERROR from
  VIR_FROM_QEMU "internal error: qemu unexpectedly closed the monitor", source keeps running.
- ``abortJob()`` on the source during the copy: the call fails ~2 s later with
  VIR_ERR_OPERATION_ABORTED "operation aborted: migration out: canceled by client"; the source keeps
  running, the destination has no domain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import libvirt

from ...core.logs import get_logger
from .pools import find_volume, volume_xml

log = get_logger(__name__)

MIGRATION_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    | libvirt.VIR_MIGRATE_NON_SHARED_DISK
)
ABORT_WAIT_SECONDS = 60.0


@dataclasses.dataclass(frozen=True)
class DiskCopy:
    """Copy the disk with target dev ``target`` (e.g. ``vda``) into ``pool`` on the destination,
    as volume ``volume`` (default: the source volume's name)."""

    target: str
    pool: str
    volume: str | None = None


@dataclasses.dataclass(frozen=True)
class CreatedVolume:
    pool: str
    name: str
    path: str
    capacity: int
    format: str


@dataclasses.dataclass(frozen=True)
class MigrationProgress:
    """One ``jobStats()`` reading of the outgoing migration job (bytes; seconds)."""

    elapsed: float
    data_processed: int
    data_total: int
    data_remaining: int
    memory_processed: int
    memory_total: int
    disk_processed: int
    disk_total: int
    memory_bps: int
    raw: Mapping[str, Any]

    @property
    def phase(self) -> str:
        """``setup`` (nothing counted yet), ``disks`` while the NBD copy runs, then ``memory``."""
        if self.disk_total and self.disk_processed < self.disk_total:
            return "disks"
        return "memory" if self.memory_total else "setup"


@dataclasses.dataclass(frozen=True)
class MigrationResult:
    seconds: float
    volumes: tuple[CreatedVolume, ...]  # created on the destination, now the domain's disks there
    completed: Mapping[str, Any]        # the destination's completed-job stats (may be empty)

    @property
    def downtime_ms(self) -> int | None:
        value = self.completed.get("downtime")
        return int(value) if value is not None else None


class MigrationError(RuntimeError):
    """The migration did not happen; the domain is still where it was (if it was running).

    ``cause`` is libvirt's error when libvirt reported one; ``left_on_destination`` names the
    pre-created volumes the cleanup could not delete ("pool/name")."""

    def __init__(self, message: str, *, cause: libvirt.libvirtError | None = None,
                 aborted: bool = False, left_on_destination: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.cause = cause
        self.aborted = aborted
        self.left_on_destination = tuple(left_on_destination)
        if cause is not None:
            self.__cause__ = cause

    @property
    def libvirt_code(self) -> int | None:
        return self.cause.get_error_code() if self.cause is not None else None

    @property
    def libvirt_domain(self) -> int | None:
        return self.cause.get_error_domain() if self.cause is not None else None


# ---- XML -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Disk:
    target: str
    path: str
    fmt: str
    readonly: bool


def _disks(domain_xml: str) -> list[_Disk]:
    disks = []
    for disk in ET.fromstring(domain_xml).iterfind("./devices/disk"):
        source, target = disk.find("source"), disk.find("target")
        if target is None or source is None or not source.get("file"):
            continue  # an empty cdrom: nothing to move
        driver = disk.find("driver")
        disks.append(_Disk(
            target=target.get("dev", ""),
            path=source.get("file", ""),
            fmt=(driver.get("type") if driver is not None else None) or "raw",
            readonly=disk.find("readonly") is not None or disk.get("device") == "cdrom",
        ))
    return disks


def destination_xml(domain_xml: str, paths: Mapping[str, str]) -> str:
    """``domain_xml`` with each ``<disk>``'s file source replaced by ``paths[target dev]``.

    Every disk with a file source must be in ``paths`` and every entry must match a disk, so a
    destination definition never points at a source host's path by accident."""
    root = ET.fromstring(domain_xml)
    seen = set()
    for disk in root.iterfind("./devices/disk"):
        source, target = disk.find("source"), disk.find("target")
        if target is None or source is None or not source.get("file"):
            continue
        dev = target.get("dev", "")
        if dev not in paths:
            raise ValueError(f"no destination path for disk {dev} ({source.get('file')})")
        source.set("file", paths[dev])
        seen.add(dev)
    unknown = set(paths) - seen
    if unknown:
        raise ValueError(f"no disk with target {', '.join(sorted(unknown))} in the domain")
    return ET.tostring(root, encoding="unicode")


# ---- volumes ---------------------------------------------------------------------------------


def _volume_facts(conn: libvirt.virConnect, path: str) -> tuple[str, int, str]:
    """(name, capacity bytes, format) of the source volume at ``path``."""
    vol = conn.storageVolLookupByPath(path)
    fmt_el = ET.fromstring(vol.XMLDesc(0)).find("./target/format")
    fmt = fmt_el.get("type", "raw") if fmt_el is not None else "raw"
    return vol.name(), int(vol.info()[1]), fmt


def _precreate_volumes(src_conn: libvirt.virConnect, dest_conn: libvirt.virConnect,
                      disks: Sequence[_Disk], copies: Sequence[DiskCopy]) -> list[CreatedVolume]:
    """Create the destination volumes (empty, same capacity and format as the source's). On any
    failure the ones created so far are deleted again and the error is raised."""
    by_target = {d.target: d for d in disks}
    created: list[CreatedVolume] = []
    try:
        for copy in copies:
            disk = by_target[copy.target]
            src_name, capacity, fmt = _volume_facts(src_conn, disk.path)
            name = copy.volume or src_name
            pool = dest_conn.storagePoolLookupByName(copy.pool)
            if find_volume(pool, name) is not None:
                raise MigrationError(f"volume {copy.pool}/{name} already exists on the destination")
            vol = pool.createXML(volume_xml(name, capacity, fmt), 0)
            created.append(CreatedVolume(copy.pool, name, vol.path(), capacity, fmt))
            log.info("migration volume pre-created", pool=copy.pool, volume=name, capacity=capacity, format=fmt)
    except BaseException:
        delete_volumes(dest_conn, created)
        raise
    return created


def delete_volumes(dest_conn: libvirt.virConnect, volumes: Sequence[CreatedVolume]) -> list[str]:
    """Delete these volumes (only these); returns the ``pool/name`` of those that could not be."""
    left = []
    for v in volumes:
        try:
            pool = dest_conn.storagePoolLookupByName(v.pool)
            vol = find_volume(pool, v.name)
            if vol is not None:
                vol.delete(0)
            log.info("migration volume deleted", pool=v.pool, volume=v.name)
        except libvirt.libvirtError as err:
            log.warning("migration volume left on the destination", pool=v.pool, volume=v.name,
                        error=err.get_error_message())
            left.append(f"{v.pool}/{v.name}")
    return left


# ---- progress and abort ----------------------------------------------------------------------


def read_progress(dom: libvirt.virDomain) -> MigrationProgress | None:
    """The running job's progress, or None when the domain has no job (or is gone)."""
    try:
        stats = dom.jobStats(0)
    except libvirt.libvirtError:
        return None
    if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
        return None

    def n(key: str) -> int:
        return int(stats.get(key, 0) or 0)

    return MigrationProgress(
        elapsed=n("time_elapsed") / 1000.0,
        data_processed=n("data_processed"), data_total=n("data_total"), data_remaining=n("data_remaining"),
        memory_processed=n("memory_processed"), memory_total=n("memory_total"),
        disk_processed=n("disk_processed"), disk_total=n("disk_total"),
        memory_bps=n("memory_bps"), raw=dict(stats),
    )


def migration_progress(conn: libvirt.virConnect, dom_uuid: str) -> MigrationProgress | None:
    return read_progress(conn.lookupByUUIDString(dom_uuid))


def abort_migration(conn: libvirt.virConnect, dom_uuid: str) -> bool:
    """Ask the source to abort the domain's job; False when there was none to abort."""
    try:
        conn.lookupByUUIDString(dom_uuid).abortJob()
    except libvirt.libvirtError as err:
        if err.get_error_code() in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
            return False
        raise
    return True


# ---- migration -------------------------------------------------------------------------------


def _plan(disks: Sequence[_Disk], copies: Sequence[DiskCopy], readonly_paths: Mapping[str, str]) -> None:
    by_target = {d.target: d for d in disks}
    for copy in copies:
        if copy.target not in by_target:
            raise ValueError(f"no disk with target {copy.target} to copy")
        if by_target[copy.target].readonly:
            raise ValueError(f"disk {copy.target} is read-only: map it in readonly_paths, do not copy it")
    copied = {c.target for c in copies}
    for d in disks:
        if d.target in copied:
            continue
        if not d.readonly:
            raise ValueError(f"writable disk {d.target} ({d.path}) is not in copy_disks "
                             "(shared storage is not supported)")
        if d.target not in readonly_paths:
            raise ValueError(f"read-only disk {d.target} ({d.path}) has no destination path")


def migrate_live(
    src_conn: libvirt.virConnect,
    dest_conn: libvirt.virConnect,
    dom_uuid: str,
    dest_uri: str,
    *,
    copy_disks: Sequence[DiskCopy],
    readonly_paths: Mapping[str, str],
    migration_uri: str | None = "tcp://127.0.0.1",
    listen_address: str | None = None,
    bandwidth_mib: int | None = None,
    timeout: float = 600.0,
    poll_interval: float = 0.5,
    on_progress: Callable[[MigrationProgress], None] | None = None,
    cancel: threading.Event | None = None,
) -> MigrationResult:
    """Migrate the running domain ``dom_uuid`` live from ``src_conn``'s host to ``dest_uri``'s.

    ``dest_conn`` is the caller's connection to the destination (volume pre-creation, cleanup,
    final stats); ``dest_uri`` is what the *source daemon* connects to (PEER2PEER).
    ``migration_uri``: where the source QEMU sends the data (``tcp://<destination address>``; None
    lets libvirt use the destination's hostname). ``readonly_paths``: target dev -> path on the
    destination of each read-only disk (ISO), which must exist there. Raises ``ValueError`` for a
    plan that does not cover the domain's disks, :class:`MigrationError` when the migration fails,
    times out or is cancelled (then the domain still runs on the source and the pre-created
    volumes are deleted again)."""
    started = time.monotonic()
    dom = src_conn.lookupByUUIDString(dom_uuid)
    if not dom.isActive():
        raise MigrationError(f"domain {dom.name()} is not running")
    src_xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
    disks = _disks(src_xml)
    _plan(disks, copy_disks, readonly_paths)
    bound = log.bind(domain=dom.name(), uuid=dom_uuid, dest=dest_uri)

    created = _precreate_volumes(src_conn, dest_conn, disks, copy_disks)
    paths = dict(readonly_paths)
    for copy, vol in zip(copy_disks, created, strict=True):
        paths[copy.target] = vol.path
    params: dict[str, Any] = {
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: destination_xml(src_xml, paths),
        libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: [c.target for c in copy_disks],
    }
    if migration_uri:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = migration_uri
    if listen_address:
        params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = listen_address
    if bandwidth_mib:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(bandwidth_mib)

    outcome: dict[str, BaseException | None] = {}

    def run() -> None:
        try:
            dom.migrateToURI3(dest_uri, params, MIGRATION_FLAGS)
            outcome["error"] = None
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    bound.info("migration started", disks=[c.target for c in copy_disks], bandwidth_mib=bandwidth_mib)
    worker = threading.Thread(target=run, name=f"migrate-{dom_uuid}", daemon=True)
    worker.start()
    aborted = None
    while worker.is_alive():
        worker.join(poll_interval)
        if not worker.is_alive():
            break
        if on_progress is not None and (progress := read_progress(dom)) is not None:
            with contextlib.suppress(Exception):
                on_progress(progress)
        if aborted is None and ((cancel is not None and cancel.is_set()) or time.monotonic() - started > timeout):
            aborted = "cancelled" if cancel is not None and cancel.is_set() else f"timed out after {timeout:.0f}s"
            bound.warning("migration aborting", why=aborted)
            with contextlib.suppress(libvirt.libvirtError):
                dom.abortJob()
            worker.join(ABORT_WAIT_SECONDS)
    seconds = time.monotonic() - started
    error = outcome.get("error") if not worker.is_alive() else MigrationError(
        f"migration did not end {ABORT_WAIT_SECONDS:.0f}s after abortJob()")

    if error is None and aborted is None:
        completed: dict[str, Any] = {}
        with contextlib.suppress(libvirt.libvirtError):
            completed = dict(dest_conn.lookupByUUIDString(dom_uuid).jobStats(
                libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED))
        bound.info("migration succeeded", seconds=round(seconds, 3), downtime_ms=completed.get("downtime"))
        return MigrationResult(seconds, tuple(created), completed)
    if error is None:  # it finished although we asked it to stop: it happened
        bound.warning("migration completed despite abort", why=aborted)
        return MigrationResult(seconds, tuple(created), {})

    # A job still running after abortJob() may yet complete: its volumes are not ours to delete then.
    left = (delete_volumes(dest_conn, created) if not worker.is_alive()
            else [f"{v.pool}/{v.name}" for v in created])
    cause = error if isinstance(error, libvirt.libvirtError) else None
    message = aborted or (error.get_error_message() if cause is not None else str(error)) or repr(error)
    if aborted and cause is not None:
        message = f"{aborted}: {cause.get_error_message()}"
    bound.warning("migration failed", seconds=round(seconds, 3), error=message,
                  libvirt_code=cause.get_error_code() if cause is not None else None, left_on_destination=left)
    if isinstance(error, MigrationError):
        raise MigrationError(str(error), aborted=aborted is not None, left_on_destination=left) from error
    if cause is None:
        raise error
    raise MigrationError(message, cause=cause, aborted=aborted is not None, left_on_destination=left)

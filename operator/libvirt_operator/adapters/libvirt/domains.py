"""Thin blocking domain and volume operations: each takes a virConnect and runs in the host's
thread pool via ``HostConnection.call``. libvirt errors propagate (the connection classifies
them); "not found" is an answer (None/False), not an error."""

from __future__ import annotations

import contextlib
import dataclasses
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable

import libvirt

from ...core.errors import AppError, ErrorCode
from ...core.domain import (
    ABSENT, DomainObservation, PowerState, StopCause, legacy_volume_name, owned_volume_prefix, owns_volume,
)
from ...core.logs import get_logger
from .errors import CONNECTION_LOST
from .pools import active_pool, find_pool, find_volume, volume_xml
from .domain_xml import DomainMetadata, disk_sources, interface_macs, parse_metadata

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: PowerState.UNKNOWN,
    libvirt.VIR_DOMAIN_RUNNING: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: PowerState.SHUTTING_DOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: PowerState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: PowerState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PowerState.PAUSED,
}
_SHUTOFF_CAUSES = {
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: StopCause.CLEAN,
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: StopCause.DESTROYED,
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: StopCause.FAILURE,
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: StopCause.FAILURE,
}
_NOT_FOUND = {libvirt.VIR_ERR_NO_DOMAIN}
log = get_logger(__name__)


def observation(state: int, reason: int, name: str | None = None, uuid: str | None = None) -> DomainObservation:
    power = _STATES.get(state, PowerState.UNKNOWN)
    cause = StopCause.NONE
    if power is PowerState.SHUTOFF:
        cause = _SHUTOFF_CAUSES.get(reason, StopCause.UNKNOWN if reason else StopCause.NONE)
    elif power is PowerState.CRASHED:
        cause = StopCause.FAILURE
    return DomainObservation(power, cause, name, uuid)


def _lookup(conn: libvirt.virConnect, uuid: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as err:
        if err.get_error_code() in _NOT_FOUND:
            return None
        raise


def list_domains(conn: libvirt.virConnect) -> dict[str, DomainObservation]:
    """Every domain on the host with its state, in ONE bulk call (getAllDomainStats state group);
    keyed by UUID. This is the steady-state resync: never one lookup per VM."""
    result: dict[str, DomainObservation] = {}
    for dom, stats in conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 0):
        uuid = dom.UUIDString()
        result[uuid] = observation(int(stats.get("state.state", 0)), int(stats.get("state.reason", 0)),
                                   dom.name(), uuid)
    return result


@dataclasses.dataclass(frozen=True)
class Booted:
    """The start that followed a define in the same call: the state after it, or libvirt's refusal
    (for the caller to classify and report as that start's failure; the define itself succeeded)."""
    observation: DomainObservation | None
    error: libvirt.libvirtError | None = None


@dataclasses.dataclass(frozen=True)
class DomainDetails:
    observation: DomainObservation
    defined: DomainMetadata          # from the persistent definition
    live: DomainMetadata | None      # from the running definition (None when not running)
    macs: dict[str, str]
    booted: Booted | None = None     # define(..., boot=True) only


def get_domain(conn: libvirt.virConnect, uuid: str) -> DomainDetails | None:
    """State plus our metadata of one domain (used after spec changes, not in steady state)."""
    dom = _lookup(conn, uuid)
    if dom is None:
        return None
    return _describe(dom, uuid, bool(dom.isPersistent()))


_ACTIVE_STATES = {libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED, libvirt.VIR_DOMAIN_PAUSED,
                  libvirt.VIR_DOMAIN_SHUTDOWN, libvirt.VIR_DOMAIN_PMSUSPENDED}


def _describe(dom: libvirt.virDomain, uuid: str, persistent: bool) -> DomainDetails:
    """One round trip per fact: the state (whether it runs follows from it: no isActive call unless
    the state is ambiguous), the persistent definition, the running one while it runs."""
    state, reason = dom.state()
    obs = observation(state, reason, dom.name(), uuid)
    inactive_xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) if persistent else None
    active = state in _ACTIVE_STATES or (state != libvirt.VIR_DOMAIN_SHUTOFF and bool(dom.isActive()))
    live_xml = dom.XMLDesc(0) if active else None
    defined = parse_metadata(inactive_xml) if inactive_xml else DomainMetadata(None, None)
    live = parse_metadata(live_xml) if live_xml else None
    return DomainDetails(obs, defined, live, interface_macs(live_xml or inactive_xml or "<domain/>"))


def find_by_name(conn: libvirt.virConnect, name: str) -> tuple[str, DomainMetadata] | None:
    """UUID and metadata of a domain with this name (to detect a name taken by a foreign domain)."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() in _NOT_FOUND:
            return None
        raise
    return dom.UUIDString(), parse_metadata(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


@dataclasses.dataclass(frozen=True)
class NameTaken:
    """define refused: another domain (another UUID) holds the name."""

    uuid: str
    metadata: DomainMetadata


def define(conn: libvirt.virConnect, xml: str, uuid: str, name: str, *,
           boot: bool = False) -> DomainDetails | NameTaken:
    """(Re)define the domain and describe it from the object defineXML returns (3 round trips, where a
    define then a lookup took 7; in a burst each waits for one of the daemon's workers). libvirt itself
    refuses a name another UUID holds: then whose it is (NameTaken), for the caller to say.

    `boot`: start it too, in the same call, if it is shut off and never ran (a new domain): one slot
    and one daemon turn instead of two, so a burst of new VMs boots from the first define on instead
    of queueing every start behind every define."""
    try:
        dom = conn.defineXML(xml)
    except libvirt.libvirtError:
        taken = find_by_name(conn, name)
        if taken is not None and taken[0] != uuid:
            return NameTaken(*taken)
        raise
    details = _describe(dom, uuid, True)
    found = details.observation
    if not boot or found.state is not PowerState.SHUTOFF or found.stop_cause is not StopCause.NONE:
        return details  # not what the caller planned a start for (it runs, or it ran before): it decides
    try:
        _create(dom)
    except libvirt.libvirtError as err:
        if err.get_error_code() in CONNECTION_LOST:
            raise  # the connection's to handle (reopen and run this again: the define is idempotent)
        return dataclasses.replace(details, booted=Booted(None, err))
    return dataclasses.replace(details, booted=Booted(observation(*dom.state(), dom.name(), uuid)))


def _create(dom: libvirt.virDomain) -> None:
    """Boot it; one that runs already is left as it is (the daemon answers that atomically: no
    isActive round trip first)."""
    try:
        dom.create()
    except libvirt.libvirtError as err:
        # "domain is already running" (or paused): fine; any other refusal is the start's failure
        if err.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID or not dom.isActive():
            raise


def start(conn: libvirt.virConnect, uuid: str) -> DomainObservation:
    dom = conn.lookupByUUIDString(uuid)
    _create(dom)
    return observation(*dom.state(), dom.name(), uuid)


def shutdown(conn: libvirt.virConnect, uuid: str) -> DomainObservation:
    dom = conn.lookupByUUIDString(uuid)
    if dom.isActive():
        dom.shutdown()
    return observation(*dom.state(), dom.name(), uuid)


def destroy(conn: libvirt.virConnect, uuid: str) -> DomainObservation:
    dom = _lookup(conn, uuid)
    if dom is None:
        return ABSENT
    if dom.isActive():
        try:
            dom.destroy()
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # stopped meanwhile
                raise
    return observation(*dom.state(), dom.name(), uuid)


def state(conn: libvirt.virConnect, uuid: str) -> DomainObservation:
    """One domain's power state (ABSENT when it does not exist)."""
    dom = _lookup(conn, uuid)
    if dom is None:
        return ABSENT
    return observation(*dom.state(), dom.name(), uuid)


def suspend(conn: libvirt.virConnect, uuid: str) -> DomainObservation:
    dom = conn.lookupByUUIDString(uuid)
    if dom.state()[0] != libvirt.VIR_DOMAIN_PAUSED:
        dom.suspend()
    return observation(*dom.state(), dom.name(), uuid)


def resume(conn: libvirt.virConnect, uuid: str) -> DomainObservation:
    dom = conn.lookupByUUIDString(uuid)
    if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
        dom.resume()
    return observation(*dom.state(), dom.name(), uuid)


_UNDEFINE_FLAGS = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                   | getattr(libvirt, "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 0))


def undefine(conn: libvirt.virConnect, uuid: str) -> bool:
    """Remove the definition, UEFI NVRAM included. False when it was already gone."""
    dom = _lookup(conn, uuid)
    if dom is None:
        return False
    if not dom.isPersistent():
        return False
    return _undefine(dom)


def _undefine(dom: libvirt.virDomain) -> bool:
    for flags in (_UNDEFINE_FLAGS | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM, _UNDEFINE_FLAGS, None):
        try:
            if flags is None:
                dom.undefine()
            else:
                dom.undefineFlags(flags)
            return True
        except libvirt.libvirtError as err:
            # Drivers without NVRAM/snapshot support reject the flags: retry with fewer.
            if flags is None or err.get_error_code() not in (
                    libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED):
                raise
    return True


@dataclasses.dataclass(frozen=True)
class VolumeRequest:
    pool: str
    name: str          # core.domain.volume_name(uid, disk): named with the owner's uid
    size_bytes: int
    disk: str = ""     # the spec's disk name (to recognise a volume of the earlier naming scheme)
    shared: bool = False  # the pool is in the host's spec.sharedPools: other hosts may have written it


@dataclasses.dataclass(frozen=True)
class VolumeResult:
    pool: str
    name: str
    path: str
    created: bool
    disk: str = ""


@dataclasses.dataclass(frozen=True)
class OwnDomain:
    """What the VM's own domain (UUID = the VM's uid) says on the host: its name and the file each of
    its disks (our ua-disk-<name> aliases, device=disk) uses. The only evidence, besides a volume's
    name, that a volume belongs to a VM; never taken from the Kubernetes status."""

    name: str
    disk_sources: dict[str, str]


def own_domain(conn: libvirt.virConnect, uid: str) -> OwnDomain | None:
    """The domain whose UUID is this uid (the VM's own), or None."""
    dom = _lookup(conn, uid)
    return None if dom is None else _own(dom)


def _own(dom: libvirt.virDomain) -> OwnDomain:
    """What the domain's disks use, in both its definitions: the current XML (the running one while
    it runs, else the persistent one) says by its `id` whether it runs, so the persistent one is
    asked for only then, and no isActive/isPersistent round trip precedes them."""
    sources: dict[str, str] = {}
    current = dom.XMLDesc(0)
    xmls = [current]
    if ET.fromstring(current).get("id") not in (None, "-1"):  # running: its next boot's definition too
        xmls.append(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    for xml in xmls:
        for disk, path in disk_sources(xml).items():
            sources.setdefault(disk, path)
    return OwnDomain(dom.name(), sources)


def _legacy_volume(pool: libvirt.virStoragePool, own: OwnDomain | None, disk: str) -> libvirt.virStorageVol | None:
    """A volume of the earlier scheme (``<domain>-<disk>``) that the VM's own domain uses for that
    very disk; anything else with such a name is not the VM's."""
    if own is None or not disk or disk not in own.disk_sources:
        return None
    vol = find_volume(pool, legacy_volume_name(own.name, disk))
    if vol is None or vol.path() != own.disk_sources[disk]:
        return None
    return vol


def ensure_volumes(conn: libvirt.virConnect, uid: str, requests: Iterable[VolumeRequest]) -> list[VolumeResult]:
    """Create the qcow2 volumes that do not exist yet. An existing volume is kept only when its name
    carries this VM's uid, or when the VM's own domain already uses it for that disk (volumes of
    the earlier naming scheme, after an upgrade); no other volume is ever adopted."""
    requests = list(requests)
    for req in requests:
        if not owns_volume(uid, req.name):
            raise AppError(ErrorCode.INVALID_SPEC, f"volume {req.name} is not named for VirtualMachine uid {uid}",
                           {"volume": req.name[:64]})
    own = own_domain(conn, uid) if any(r.disk for r in requests) else None
    results = []
    for req in requests:
        pool = active_pool(conn, req.pool)
        vol = find_volume(pool, req.name)
        created = False
        if vol is None:
            vol = _legacy_volume(pool, own, req.disk)
        if vol is None and req.shared:
            # A pool shared with other hosts (spec.sharedPools) learns of their volumes only on a refresh:
            # the VM's disk may be there already, written from the host it left.
            with contextlib.suppress(libvirt.libvirtError):
                pool.refresh(0)
            vol = find_volume(pool, req.name)
        if vol is None:
            vol = pool.createXML(volume_xml(req.name, req.size_bytes, "qcow2"), 0)
            created = True
        results.append(VolumeResult(req.pool, vol.name(), vol.path(), created, req.disk))
    return results


def volume_path(conn: libvirt.virConnect, pool: str, name: str) -> str | None:
    """Path of a volume (e.g. an ISOImage's) or None when the pool or volume does not exist."""
    p = find_pool(conn, pool)
    if p is None:
        return None
    vol = find_volume(p, name)
    return vol.path() if vol is not None else None


def _volume_by_path(conn: libvirt.virConnect, path: str) -> libvirt.virStorageVol | None:
    try:
        return conn.storageVolLookupByPath(path)
    except libvirt.libvirtError as err:
        if err.get_error_code() in (libvirt.VIR_ERR_NO_STORAGE_VOL, libvirt.VIR_ERR_NO_STORAGE_POOL):
            return None
        raise


def _paths_used_by_others(conn: libvirt.virConnect, uid: str) -> set[str]:
    """Disk files used by any other domain on the host (one XML read per domain: only asked for
    volumes of the earlier, ambiguous naming scheme)."""
    used: set[str] = set()
    for dom in conn.listAllDomains(0):
        with contextlib.suppress(libvirt.libvirtError):
            if dom.UUIDString() == uid:
                continue
            root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if dom.isPersistent() else 0))
            for source in root.iterfind("./devices/disk/source"):
                if source.get("file"):
                    used.add(source.get("file", ""))
    return used


def delete_owned_volumes(conn: libvirt.virConnect, uid: str, pools: Iterable[str],
                         own: OwnDomain | None, refresh: Iterable[str] | None = None) -> list[str]:
    """Delete the VM's volumes, decided from the host alone: (a) every volume named with its uid in
    the given pools and in the pools its domain's disks live in; (b) volumes of the earlier naming
    scheme that its own domain used for the matching disk, unless another domain uses that file too.
    Missing pools/volumes are fine. Returns the names deleted. `refresh`: the pools refreshed before
    listing (None: all of them); a pool only this host uses lists every volume created through its
    daemon without one (its daemon refreshes it at start), while a pool shared with other hosts learns
    of their volumes only on a refresh."""
    prefix = owned_volume_prefix(uid)
    targets: dict[str, libvirt.virStorageVol] = {}
    legacy: dict[str, libvirt.virStorageVol] = {}
    pool_names = set(pools)
    for disk, path in (own.disk_sources.items() if own is not None else ()):
        vol = _volume_by_path(conn, path)
        if vol is None:
            continue
        name = vol.name()
        if owns_volume(uid, name):
            targets[path] = vol
        elif own is not None and name == legacy_volume_name(own.name, disk):
            legacy[path] = vol
        with contextlib.suppress(libvirt.libvirtError):
            pool_names.add(vol.storagePoolLookupByVolume().name())
    active = {p.name(): p for p in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)}
    for pool_name in sorted(pool_names):
        pool = active.get(pool_name)  # one list: no lookup + isActive per pool
        if pool is None:
            continue
        if refresh is None or pool_name in refresh:
            with contextlib.suppress(libvirt.libvirtError):
                pool.refresh(0)
        for vol in pool.listAllVolumes(0):
            if vol.name().startswith(prefix):
                targets.setdefault(vol.path(), vol)
    if legacy:
        shared = _paths_used_by_others(conn, uid)
        for path, vol in legacy.items():
            if path in shared:
                log.warning("volume of the earlier naming scheme is used by another domain too: kept",
                            volume=vol.name(), path=path)
            else:
                targets.setdefault(path, vol)
    deleted = []
    for path in sorted(targets):
        vol = targets[path]
        try:
            name = vol.name()
            vol.delete(0)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                continue  # gone meanwhile
            raise
        deleted.append(name)
    return deleted


def teardown(conn: libvirt.virConnect, uuid: str, pools: Iterable[str],
             shared_pools: Iterable[str] | None = None) -> list[str]:
    """Delete path in one call: read what the VM's own domain uses, power off, undefine (with NVRAM),
    delete the VM's volumes (see `delete_owned_volumes`). Never a volume because status lists it.
    `shared_pools`: the host's pools other hosts see too, the only ones refreshed before the volumes are
    listed (None: every pool searched; a refresh locks the pool and reads every file in it, which adds up
    when a hundred VMs go at once)."""
    dom = _lookup(conn, uuid)
    own: OwnDomain | None = None
    if dom is not None:  # one lookup for all steps (in a burst of 100 each round trip waits for a worker)
        try:
            own = _own(dom)
            try:
                dom.destroy()  # asked unconditionally: the daemon decides "not running" atomically
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # not running
                    raise
            _undefine(dom)  # a transient domain is gone once destroyed: "not found" below
        except libvirt.libvirtError as err:
            if err.get_error_code() not in _NOT_FOUND:  # undefined meanwhile: gone is what we want
                raise
    return delete_owned_volumes(conn, uuid, pools, own, None if shared_pools is None else set(shared_pools))


def _local_pools(conn: libvirt.virConnect, shared_pools: Iterable[str]) -> list[str]:
    """This host's active pools that no other host sees (not in its spec.sharedPools)."""
    shared = set(shared_pools)
    return [p.name() for p in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
            if p.name() not in shared]


def remove_stale_copy(conn: libvirt.virConnect, uuid: str, shared_pools: Iterable[str]) -> tuple[bool, list[str]]:
    """Fencing cleanup on a host a VM was recreated away from: power its domain off here and undefine it;
    delete the volumes named with its uid in this host's other pools (host-local leftovers such as the
    cloud-init seed). Volumes in `shared_pools` are the VM's live disks on its new host: never touched,
    whatever the domain's disks point at. Returns (a domain was there, volumes deleted)."""
    found = _lookup(conn, uuid) is not None
    destroy(conn, uuid)
    undefine(conn, uuid)
    local = _local_pools(conn, shared_pools)
    return found, delete_owned_volumes(conn, uuid, local, None)


def delete_leftovers(conn: libvirt.virConnect, uuid: str, shared_pools: Iterable[str]) -> list[str]:
    """After a migration to this host was rolled back: the volumes named with the VM's uid in this host's
    pools outside `shared_pools` (the seed uploaded for it, a copy libvirt left). Nothing at all while a
    domain of that uid is here: then they are a domain's disks."""
    if _lookup(conn, uuid) is not None:
        return []
    local = _local_pools(conn, shared_pools)
    return delete_owned_volumes(conn, uuid, local, None)


def eject_cdroms(conn: libvirt.virConnect, uuid: str) -> int:
    """Empty every cdrom of a domain (live and persistent). Needs a real daemon
    (the test driver has no updateDeviceFlags). Returns how many were ejected."""
    dom = conn.lookupByUUIDString(uuid)
    root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    count = 0
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
    for disk in root.iterfind("./devices/disk[@device='cdrom']"):
        source = disk.find("source")
        if source is None:
            continue
        disk.remove(source)
        with contextlib.suppress(libvirt.libvirtError):
            dom.updateDeviceFlags(ET.tostring(disk, encoding="unicode"), flags)
            count += 1
    return count


_SUBSCRIBED_ATTR = "_libvirt_operator_lifecycle"


def subscribe_lifecycle(conn: libvirt.virConnect, callback: Callable[[str, int, int], None]) -> bool:
    """Register callback(uuid, event, detail) for domain lifecycle events on this connection, once
    per connection object. Needs libvirtaio registered before the connection was opened; callbacks
    then arrive on the asyncio loop. Returns False when this connection was already subscribed."""
    if getattr(conn, _SUBSCRIBED_ATTR, False):
        return False

    def on_event(_conn: libvirt.virConnect, dom: libvirt.virDomain, event: int, detail: int, _opaque: object) -> None:
        try:
            uuid = dom.UUIDString()
        except libvirt.libvirtError:
            uuid = ""
        callback(uuid, event, detail)

    conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_event, None)
    setattr(conn, _SUBSCRIBED_ATTR, True)
    return True






def owners(conn: libvirt.virConnect, uuids: Iterable[str]) -> dict[str, DomainMetadata]:
    """Our ownership metadata of the given domains (only called for domains no VM accounts for,
    so steady state costs nothing); domains that vanished meanwhile are skipped."""
    result: dict[str, DomainMetadata] = {}
    for uuid in uuids:
        dom = _lookup(conn, uuid)
        if dom is None:
            continue
        with contextlib.suppress(libvirt.libvirtError):
            result[uuid] = parse_metadata(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    return result

"""status.interfaces and status.ipAddress from the spec, the domain's MACs and what the address
sources reported (pure: no kopf, no libvirt, no I/O), plus the polling schedule.

The same inputs always give the same dicts (sorted, empty lists left out), so the caller can
compare old and new status and write only when something changed."""

from __future__ import annotations

import dataclasses
import ipaddress
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..core.addresses import TRUST_ORDER, AddressObservation, ReportedAddress

# Polling a running VM that has interfaces. While no address is known: every 5 s during the first
# minute of a run (a booting guest asks for its lease within seconds to a minute), then backing off
# to one call every 30 s (a guest that never gets one, e.g. a static address on a bridge). Once
# known: every 60 s (leases rarely change). A new run starts over.
FIRST_POLL_SECONDS = 3.0
EAGER_POLL_SECONDS = 5.0
EAGER_WINDOW_SECONDS = 60.0
MISSING_POLL_CAP_SECONDS = 30.0
KNOWN_POLL_SECONDS = 60.0


def _field(iface: Any, key: str, default: Any = None) -> Any:
    if isinstance(iface, Mapping):
        return iface.get(key, default)
    return getattr(iface, key, default)


def _rank(a: ReportedAddress) -> tuple[int, int, str]:
    """IPv4 before IPv6; global before link-local; then by address (a stable order)."""
    try:
        ip = ipaddress.ip_address(a.address)
        link_local = ip.is_link_local
        key = (ip.version, int(ip))
    except ValueError:
        link_local, key = False, (9, 0)
    return (1 if link_local else 0, key[0], f"{key[1]:040d}")


def addresses_for(mac: str | None, observation: AddressObservation) -> list[dict[str, Any]]:
    """The addresses of one MAC from the most exact source that knows any (agent, lease, arp)."""
    if not mac:
        return []
    mac = mac.lower()
    reports = sorted(observation.reports, key=lambda r: TRUST_ORDER.index(r.source))
    for report in reports:
        found = report.by_mac.get(mac)
        if found:
            return [{"address": a.address, **({"prefix": a.prefix} if a.prefix is not None else {}),
                     "family": a.family, "source": report.source} for a in sorted(found, key=_rank)]
    return []


def interfaces_status(spec_interfaces: Iterable[Any], macs: Mapping[str, str] | None,
                      previous: Sequence[Mapping[str, Any]] | None, *, running: bool,
                      observation: AddressObservation | None = None) -> list[dict[str, Any]]:
    """One entry per spec interface: name, mac, network or bridge, and ipAddresses.

    Addresses: none unless `running`; from `observation` when given; otherwise the previous entry's,
    as long as its MAC is unchanged (a full reconcile must not drop what the poller found)."""
    before = {str(p.get("name")): p for p in previous or [] if isinstance(p, Mapping)}
    result: list[dict[str, Any]] = []
    for iface in spec_interfaces:
        name = str(_field(iface, "name"))
        old = before.get(name) or {}
        mac = (macs or {}).get(name) or (old.get("mac") if macs is None else None)
        entry: dict[str, Any] = {"name": name}
        if mac:
            entry["mac"] = mac
        kind, source = _field(iface, "type", "user"), _field(iface, "source")
        if kind == "network" and source:
            entry["network"] = source
        elif kind == "bridge" and source:
            entry["bridge"] = source
        if running:
            if observation is not None:
                addrs = addresses_for(mac, observation)
            else:
                addrs = list(old.get("ipAddresses") or []) if old.get("mac") == mac else []
            if addrs:
                entry["ipAddresses"] = addrs
        result.append(entry)
    return result


def first_address(interfaces: Iterable[Mapping[str, Any]]) -> str | None:
    for iface in interfaces:
        for a in iface.get("ipAddresses") or []:
            return str(a["address"])
    return None


def put(status: dict[str, Any], interfaces: list[dict[str, Any]]) -> None:
    """Write interfaces and the IP column's ipAddress into a status dict."""
    status["interfaces"] = interfaces
    ip = first_address(interfaces)
    if ip:
        status["ipAddress"] = ip
    else:
        status.pop("ipAddress", None)


def without_addresses(status: dict[str, Any]) -> None:
    """The domain is not running: its addresses are gone (names and MACs stay)."""
    if status.get("interfaces"):
        put(status, [{k: v for k, v in i.items() if k != "ipAddresses"} for i in status["interfaces"]])
    else:
        status.pop("ipAddress", None)


@dataclasses.dataclass
class _Due:
    run: Any
    since: float  # when this run was first seen
    at: float
    interval: float


class PollSchedule:
    """When each running VM's addresses are asked for next (monotonic seconds), per VM uid."""

    def __init__(self) -> None:
        self._due: dict[str, _Due] = {}

    def due(self, uid: str, run: Any, now: float, *, known: bool = False) -> bool:
        """`run` identifies the VM's current run (e.g. status.lastStartTime): a new one polls soon.
        A VM first seen with addresses already `known` (an operator restart) is first asked at a
        point of the KNOWN_POLL_SECONDS period fixed by its uid, so a restart spreads the calls."""
        entry = self._due.get(uid)
        if entry is None or entry.run != run:
            first = FIRST_POLL_SECONDS
            if known:
                first += KNOWN_POLL_SECONDS * (zlib.crc32(uid.encode()) % 1000) / 1000
            self._due[uid] = _Due(run, now, now + first, FIRST_POLL_SECONDS)
            return False
        return now >= entry.at

    def polled(self, uid: str, now: float, *, found: bool) -> None:
        entry = self._due.get(uid)
        if entry is None:
            return
        if found:
            entry.interval = KNOWN_POLL_SECONDS
        elif now - entry.since < EAGER_WINDOW_SECONDS:
            entry.interval = EAGER_POLL_SECONDS
        else:
            entry.interval = min(MISSING_POLL_CAP_SECONDS, max(EAGER_POLL_SECONDS, entry.interval) * 2)
        entry.at = now + entry.interval

    def retry_soon(self, uid: str, now: float, after: float = 1.0) -> None:
        entry = self._due.get(uid)
        if entry is not None:
            entry.at = now + after

    def forget(self, uid: str) -> None:
        self._due.pop(uid, None)

    def retain(self, uids: Iterable[str]) -> None:
        """Drop the entries of VMs that are gone."""
        keep = set(uids)
        for uid in [u for u in self._due if u not in keep]:
            del self._due[uid]

    def __len__(self) -> int:
        return len(self._due)

"""Live migration between two real libvirtd hosts (QEMU/TCG) through adapters.libvirt.migration.

The guest is the test ISO's heartbeat variant (libvirt_operator/devenv/testiso.py): it writes its
marker onto its qcow2 disk at boot, then prints "LVOP-TESTISO-TICK <n>" about once a second with a
counter kept in guest memory. After a live migration the destination's serial log must carry on
counting (no new boot), the source must have no domain left, and the copied disk on the destination
must hold what the guest wrote on the source."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from libvirt_operator.adapters.libvirt.domain_xml import build_domain_xml
from libvirt_operator.adapters.libvirt.migration import (
    DiskCopy,
    MigrationError,
    MigrationProgress,
    migrate_live,
)
from libvirt_operator.adapters.libvirt.pools import volume_xml
from libvirt_operator.core.domain import DiskDefinition, DomainDefinition, Owner
from libvirt_operator.devenv.libvirtd import LibvirtDaemon
from tests.harness.libvirt_module import libvirt
from tests.harness.pytest_libvirt import unavailable
from tests.harness.test_iso import (
    DISK_MARKER_WRITTEN,
    GRUB_MARKER,
    HEARTBEAT_MARKER,
    KERNEL_MARKER,
    TICK_MARKER,
    build_test_iso,
    iso_build_available,
)

ISO = "heartbeat.iso"
DISK_BYTES = 16 * 2**20
DISK_MARKER = b"LVOP-DISK-MARKER"  # what the test kernel writes at the start of its virtio disk
_TICK = re.compile(rf"{TICK_MARKER} (\d+)")
T = TypeVar("T")


def wait_for(fn: Callable[[], T | None], *, timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := fn():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def hosts(libvirtd_factory, tmp_path_factory) -> tuple[LibvirtDaemon, LibvirtDaemon]:
    ok, reason = iso_build_available()
    if not ok:
        unavailable("test ISO build", reason)
    iso, _markers = build_test_iso(tmp_path_factory.mktemp("heartbeat-iso"), heartbeat=True)
    a, b = libvirtd_factory.many(2)
    assert a.host_uuid != b.host_uuid
    for host in (a, b):  # the ISO on both hosts (the pools are plain directories, visible here)
        shutil.copyfile(iso, host.pool_path / ISO)
        conn = host.connect()
        try:
            conn.storagePoolLookupByName("default").refresh(0)
        finally:
            conn.close()
    return a, b


@pytest.fixture
def conns(hosts) -> Iterator[tuple[Any, Any]]:
    a, b = hosts
    ca, cb = a.connect(), b.connect()
    yield ca, cb
    ca.close()
    cb.close()


class Guest:
    """A running heartbeat guest on host A: a qcow2 data disk and the ISO as its boot cdrom."""

    def __init__(self, host: LibvirtDaemon, conn: Any) -> None:
        self.uuid = str(uuid.uuid4())
        self.name = f"mig_{self.uuid[:8]}"
        self.volume = f"lvop-{self.uuid}-data"
        pool = conn.storagePoolLookupByName("default")
        vol = pool.createXML(volume_xml(self.volume, DISK_BYTES, "qcow2"), 0)
        defn = DomainDefinition(
            name=self.name, uuid=self.uuid, vcpus=1, memory_bytes=64 * 2**20, type="qemu",
            firmware="bios", owner=Owner("mig", self.name, self.uuid),
            disks=(DiskDefinition("cd", "cdrom", str(host.pool_path / ISO), boot_order=1),
                   DiskDefinition("data", "disk", vol.path(), pool="default", volume=self.volume)))
        conn.defineXML(build_domain_xml(defn)).create()

    def serial(self, host: LibvirtDaemon) -> str:
        path = host.log_dir / "qemu" / f"{self.name}-serial.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def ticks(self, host: LibvirtDaemon) -> list[int]:
        return [int(n) for n in _TICK.findall(self.serial(host))]

    def wait_ticks(self, host: LibvirtDaemon, count: int, timeout: float = 30) -> list[int]:
        return wait_for(lambda: (t := self.ticks(host)) and len(t) >= count and t,
                        timeout=timeout, what=f"{count} ticks of {self.name} on {host.name}")


def domain_or_none(conn: Any, dom_uuid: str) -> Any:
    try:
        return conn.lookupByUUIDString(dom_uuid)
    except libvirt.libvirtError as err:
        assert err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN, err
        return None


def cleanup(conns: tuple[Any, Any], guest: Guest) -> None:
    for conn in conns:
        dom = domain_or_none(conn, guest.uuid)
        if dom is not None:
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefine()
        pool = conn.storagePoolLookupByName("default")
        pool.refresh(0)
        if guest.volume in pool.listVolumes():
            pool.storageVolLookupByName(guest.volume).delete(0)


def first_bytes(path: str, tmp: Path) -> bytes:
    """The guest's view of the qcow2 volume's first bytes (shared lock: the domain runs)."""
    raw = tmp / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", path, str(raw)], check=True,
                   capture_output=True, timeout=60)
    return raw.read_bytes()[:64]


def test_a_running_guest_moves_to_the_other_host_and_keeps_running(hosts, conns, tmp_path) -> None:
    a, b = hosts
    ca, cb = conns
    guest = Guest(a, ca)
    try:
        before = guest.wait_ticks(a, 2)
        assert DISK_MARKER_WRITTEN in guest.serial(a) and HEARTBEAT_MARKER in guest.serial(a)

        readings: list[MigrationProgress] = []
        result = migrate_live(ca, cb, guest.uuid, b.uri,
                              copy_disks=[DiskCopy("vda", "default")],
                              readonly_paths={"hda": str(b.pool_path / ISO)},
                              listen_address="127.0.0.1", poll_interval=0.2, on_progress=readings.append)
        print(f"measured: migration {result.seconds:.2f}s, downtime {result.downtime_ms} ms, "
              f"{len(readings)} progress readings, completed stats {dict(result.completed)}")

        # Gone from A: not running, not defined.
        assert domain_or_none(ca, guest.uuid) is None
        # Running on B, defined there, its disks on B's pool.
        dom = cb.lookupByUUIDString(guest.uuid)
        assert dom.state() == [libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED]
        assert dom.isPersistent()
        sources = {d.find("target").get("dev"): d.find("source").get("file")
                   for d in ET.fromstring(dom.XMLDesc(0)).iterfind("./devices/disk")}
        assert sources == {"hda": str(b.pool_path / ISO), "vda": str(b.pool_path / guest.volume)}

        # The guest keeps counting on B where it left off on A: it kept running, it did not boot again.
        on_b = guest.wait_ticks(b, 2)
        last_on_a = guest.ticks(a)[-1]
        assert on_b[0] in (last_on_a, last_on_a + 1, last_on_a + 2), (guest.ticks(a), on_b)
        assert on_b == list(range(on_b[0], on_b[0] + len(on_b)))
        assert last_on_a >= before[-1]
        for marker in (GRUB_MARKER, KERNEL_MARKER, DISK_MARKER_WRITTEN):
            assert marker not in guest.serial(b)

        # The copied disk exists on B with the source's size and format, and holds what the guest
        # wrote on A before the migration.
        [created] = result.volumes
        assert (created.pool, created.name, created.capacity, created.format) == (
            "default", guest.volume, DISK_BYTES, "qcow2")
        vol = cb.storagePoolLookupByName("default").storageVolLookupByName(guest.volume)
        assert vol.info()[1] == DISK_BYTES
        assert first_bytes(vol.path(), tmp_path).startswith(DISK_MARKER)
        assert readings and readings[-1].elapsed > 0
    finally:
        cleanup(conns, guest)


def test_a_destination_without_the_iso_fails_and_leaves_everything_as_it_was(hosts, conns) -> None:
    a, b = hosts
    ca, cb = conns
    guest = Guest(a, ca)
    try:
        guest.wait_ticks(a, 1)
        domains_on_b = {d.UUIDString() for d in cb.listAllDomains()}
        volumes_on_b = set(cb.storagePoolLookupByName("default").listVolumes())
        missing = str(b.pool_path / "not-there.iso")

        with pytest.raises(MigrationError) as info:
            migrate_live(ca, cb, guest.uuid, b.uri, copy_disks=[DiskCopy("vda", "default")],
                         readonly_paths={"hda": missing})
        err = info.value
        print(f"measured: missing ISO -> {err} (code {err.libvirt_code}, domain {err.libvirt_domain})")
        assert err.libvirt_code == libvirt.VIR_ERR_SYSTEM_ERROR
        assert err.libvirt_domain == libvirt.VIR_FROM_STORAGE
        assert "Cannot access storage file" in str(err) and missing in str(err)
        assert err.left_on_destination == ()

        # Still running on A, and still counting.
        dom = ca.lookupByUUIDString(guest.uuid)
        assert dom.isActive() and dom.isPersistent()
        count = len(guest.ticks(a))
        guest.wait_ticks(a, count + 1)
        # Nothing left on B: no domain, the pre-created volume deleted again.
        assert domain_or_none(cb, guest.uuid) is None
        assert {d.UUIDString() for d in cb.listAllDomains()} == domains_on_b
        cb.storagePoolLookupByName("default").refresh(0)
        assert set(cb.storagePoolLookupByName("default").listVolumes()) == volumes_on_b
        assert not (b.pool_path / guest.volume).exists()
    finally:
        cleanup(conns, guest)


def test_an_aborted_migration_leaves_the_guest_on_the_source(hosts, conns) -> None:
    a, b = hosts
    ca, cb = conns
    guest = Guest(a, ca)
    try:
        guest.wait_ticks(a, 1)
        cancel = threading.Event()
        readings: list[MigrationProgress] = []

        def progress(p: MigrationProgress) -> None:
            readings.append(p)
            cancel.set()  # the first reading proves the job runs; then abort it

        started = time.monotonic()
        with pytest.raises(MigrationError) as info:
            migrate_live(ca, cb, guest.uuid, b.uri, copy_disks=[DiskCopy("vda", "default")],
                         readonly_paths={"hda": str(b.pool_path / ISO)}, bandwidth_mib=1,
                         poll_interval=0.2, on_progress=progress, cancel=cancel)
        err = info.value
        print(f"measured: abort after {time.monotonic() - started:.2f}s -> {err} (code {err.libvirt_code})")
        assert err.aborted and readings
        assert err.libvirt_code == libvirt.VIR_ERR_OPERATION_ABORTED

        dom = ca.lookupByUUIDString(guest.uuid)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING and dom.isPersistent()
        count = len(guest.ticks(a))
        guest.wait_ticks(a, count + 1)
        assert domain_or_none(cb, guest.uuid) is None
        cb.storagePoolLookupByName("default").refresh(0)
        assert guest.volume not in cb.storagePoolLookupByName("default").listVolumes()
    finally:
        cleanup(conns, guest)

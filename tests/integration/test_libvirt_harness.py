"""The libvirt test harness works: file-based test-driver hosts, real libvirtd daemons on
loopback TCP (several at once), ISO upload into a dir pool, and a TCG guest that boots the
test ISO and prints both markers on its serial log."""

from __future__ import annotations

import os
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.harness.libvirt_hosts import LibvirtDaemon, boot_domain_xml

pytest_plugins = ["tests.harness.pytest_libvirt"]

try:
    import libvirt
except ImportError:  # the fixtures skip (or fail under CI=true) with the reason
    libvirt = None
else:
    libvirt.registerErrorHandler(lambda *_a: None, None)

BOOT_TIMEOUT = 15.0  # both markers normally appear ~1 s after create()


def _upload(conn, path: Path, vol_name: str):
    """Upload ``path`` into the pool ``default`` with a stream; return the volume."""
    data = path.read_bytes()
    pool = conn.storagePoolLookupByName("default")
    pool.refresh(0)
    vol = pool.createXML(
        f"<volume><name>{vol_name}</name><capacity unit='bytes'>{len(data)}</capacity>"
        "<target><format type='raw'/></target></volume>",
        0,
    )
    stream = conn.newStream(0)
    vol.upload(stream, 0, len(data), 0)
    view = memoryview(data)
    sent = 0
    while sent < len(data):
        n = stream.send(bytes(view[sent : sent + 1024 * 1024]))
        assert n > 0
        sent += n
    stream.finish()
    return vol


def _wait_for_markers(log: Path, markers, timeout: float = BOOT_TIMEOUT) -> float:
    start = time.monotonic()
    text = ""
    while time.monotonic() - start < timeout:
        if log.exists():
            text = log.read_text(errors="replace")
            if all(m in text for m in markers):
                return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"markers {markers} not in {log} after {timeout}s; got:\n{text[-2000:]}")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def _domain_types(caps_xml: str) -> set[str]:
    return set(re.findall(r"<domain type='(\w+)'", caps_xml))


def test_test_driver_host_reports_what_its_file_says(test_host_factory) -> None:
    uri = test_host_factory(
        "hv-small",
        cpus=6,
        memory_mib=12288,
        network=True,
        domains=[{"name": "web", "memory_mib": 512, "vcpus": 2},
                 {"name": "idle", "running": False}],
    )  # fmt: skip
    other = test_host_factory("hv-big", cpus=32, memory_mib=262144)
    assert uri.startswith("test:///") and uri.endswith("/hv-small.xml")

    conn = libvirt.open(uri)
    try:
        info = conn.getInfo()
        assert info[1] == 12288  # memory MiB
        assert info[2] == 6  # cpus
        pools = {p.name(): p for p in conn.listAllStoragePools()}
        assert set(pools) == {"default"} and pools["default"].isActive()
        assert [n.name() for n in conn.listAllNetworks()] == ["default"]
        states = {d.name(): d.state()[0] for d in conn.listAllDomains()}
        assert states == {"web": libvirt.VIR_DOMAIN_RUNNING, "idle": libvirt.VIR_DOMAIN_SHUTOFF}
        # The test driver's capabilities only offer its own domain type.
        assert _domain_types(conn.getCapabilities()) == {"test"}
    finally:
        conn.close()

    conn = libvirt.open(other)
    try:
        assert conn.getInfo()[1:3] == [262144, 32]
        assert conn.listAllDomains() == []
    finally:
        conn.close()


def test_two_daemons_at_once_each_boot_a_same_named_guest(libvirtd_factory, test_iso) -> None:
    a, b = libvirtd_factory.many(2)
    assert a.uri != b.uri and a.root != b.root
    print(f"\nstartup to ready: {a.startup_seconds:.2f}s / {b.startup_seconds:.2f}s")
    conns = [libvirt.open(d.uri) for d in (a, b)]
    try:
        for d, conn in zip((a, b), conns, strict=True):
            assert {"qemu"} <= _domain_types(conn.getCapabilities())
            pool = conn.storagePoolLookupByName("default")
            assert pool.isActive() and pool.autostart()
            assert f"<path>{d.pool_path}</path>" in pool.XMLDesc()
            # Each daemon is a distinct host (libvirt refuses to migrate between equal host UUIDs),
            # and keeps its UUID in its root across restarts.
            host_uuid = ET.fromstring(conn.getCapabilities()).findtext("./host/uuid")
            assert host_uuid == d.host_uuid == LibvirtDaemon(root=d.root).host_uuid
        assert a.host_uuid != b.host_uuid
        # Same domain name on both hosts, running at the same time: hosts are independent.
        doms = []
        for d, conn in zip((a, b), conns, strict=True):
            vol = _upload(conn, test_iso.path, "boot.iso")
            dom = conn.defineXML(
                boot_domain_xml("twin", cdrom=vol.path(), serial_log=d.root / "twin-serial.log")
            )
            doms.append(dom)
        assert conns[1].lookupByName("twin").UUIDString() != conns[0].lookupByName("twin").UUIDString()
        for dom in doms:
            dom.create()
        for d in (a, b):
            took = _wait_for_markers(d.root / "twin-serial.log", test_iso.markers)
            print(f"{d.name}: markers {took:.2f}s after start")
        for dom in doms:
            dom.destroy()
            dom.undefine()
        for conn in conns:
            assert conn.listAllDomains() == []
    finally:
        for conn in conns:
            conn.close()


def test_upload_iso_and_boot_it(libvirtd: LibvirtDaemon, test_iso) -> None:
    conn = libvirt.open(libvirtd.uri)
    try:
        t0 = time.monotonic()
        vol = _upload(conn, test_iso.path, "upload-test.iso")
        t_upload = time.monotonic() - t0
        assert Path(vol.path()).parent == libvirtd.pool_path
        assert Path(vol.path()).read_bytes() == test_iso.path.read_bytes()

        serial = libvirtd.root / "boot-serial.log"
        t0 = time.monotonic()
        dom = conn.defineXML(boot_domain_xml("boot-test", cdrom=vol.path(), serial_log=serial))
        t_define = time.monotonic() - t0
        t0 = time.monotonic()
        dom.create()
        t_create = time.monotonic() - t0
        took = _wait_for_markers(serial, test_iso.markers)
        text = serial.read_text(errors="replace")
        assert text.index(test_iso.markers[0]) < text.index(test_iso.markers[1])
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING

        t0 = time.monotonic()
        dom.destroy()
        t_destroy = time.monotonic() - t0
        dom.undefine()
        assert conn.listAllDomains() == []
        vol.delete(0)
        print(
            f"\nupload {t_upload * 1000:.0f} ms, define {t_define * 1000:.0f} ms, "
            f"create {t_create:.2f}s, markers {took:.2f}s after create, destroy {t_destroy:.2f}s"
        )
    finally:
        conn.close()


def test_daemon_exit_tears_everything_down(tmp_path: Path, libvirtd_factory) -> None:
    # libvirtd_factory only for its availability check (skip/fail); this daemon is our own.
    root = tmp_path / "own-host"
    with LibvirtDaemon(name="own", root=root) as d:
        conn = d.connect()
        dom = conn.defineXML(boot_domain_xml("left-running"))  # no disk: sits in the BIOS
        dom.create()
        conn.close()
        qemu_pid = int((d.run_dir / "qemu" / "left-running.pid").read_text())
        libvirtd_pid, virtlogd_pid = d.pid, d.virtlogd_pid
        assert libvirtd_pid and virtlogd_pid
        host_ns = os.readlink(f"/proc/{libvirtd_pid}/ns/mnt")
        assert host_ns != os.readlink("/proc/self/ns/mnt")
    for pid in (qemu_pid, libvirtd_pid, virtlogd_pid):
        assert _gone(pid), pid
    # Nothing is left in the host's mount namespace, so it (and its bind mounts) is gone.
    left = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and not _gone(int(entry.name)):
            try:
                if os.readlink(entry / "ns" / "mnt") == host_ns:
                    left.append(int(entry.name))
            except OSError:
                pass
    assert left == []
    assert not root.exists()
    assert str(root) not in Path("/proc/self/mountinfo").read_text()

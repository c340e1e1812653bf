"""cloud-init NoCloud seeds and disks from images on a real libvirtd (QEMU/TCG), checked by a real Linux
guest (tests/harness/linux_guest.py): it boots from the VM's disk — a clone of a qcow2 base volume
holding the guest itself — mounts the cdrom labelled cidata and prints the sha256 of the user-data it
found, its meta-data, and the size and first-MiB hash of its disk on the serial port.

Asserted as a user would see it: the guest read exactly the user data given (inline or from a Secret),
the disk is an overlay on the base (backing) or an independent copy (full) grown to `size`, the base's
bytes never change, a changed userData asks for a restart and the restarted guest reads the new seed,
a Secret's value appears in no status, event or operator log line, and deleting the VM leaves neither
its disk nor its seed on the host (the base stays)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import secrets
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.kube import condition
from tests.harness.linux_guest import (
    DONE_MARKER,
    INIT_MARKER,
    build_linux_guest_iso,
    linux_guest_available,
    serial_lines,
)
from tests.harness.pytest_libvirt import unavailable

try:
    import libvirt
except ImportError:
    libvirt = None
else:
    libvirt.registerErrorHandler(lambda *_a: None, None)

pytestmark = pytest.mark.e2e
VM = "virtualmachines"
BASE = "lvtest-linux-guest.qcow2"
BOOT_TIMEOUT = 150  # Debian kernel + initramfs under TCG on 2 shared cores: ~15-40 s


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def base_image(libvirtd, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The Linux guest as a qcow2 base volume in the host's default pool (made harness-side with qemu-img)."""
    import subprocess

    ok, reason = linux_guest_available()
    if not ok:
        unavailable("Linux test guest", reason)
    iso = build_linux_guest_iso(tmp_path_factory.mktemp("linux-guest"))
    path = libvirtd.pool_path / BASE
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(iso), str(path)], check=True, timeout=120)
    conn = libvirt.open(libvirtd.uri)
    try:
        conn.storagePoolLookupByName("default").refresh(0)
    finally:
        conn.close()
    (libvirtd.root / "log" / "qemu").mkdir(parents=True, exist_ok=True)
    first_mib = iso.read_bytes()[: 1 << 20]
    yield {"path": path, "sha": _sha(path.read_bytes()), "first_mib_sha": _sha(first_mib),
           "virtual_size": iso.stat().st_size}
    path.unlink(missing_ok=True)
    conn = libvirt.open(libvirtd.uri)
    try:
        conn.storagePoolLookupByName("default").refresh(0)  # the session's other tests see the pool as it is
    finally:
        conn.close()


@pytest.fixture
def host(kube, operator, libvirtd) -> Iterator[str]:
    name = f"ci-{uuid.uuid4().hex[:6]}"
    kube.create("libvirthosts", {"metadata": {"name": name}, "spec": {"uri": libvirtd.uri, "insecure": True}})
    kube.wait_condition("libvirthosts", name, "Ready", "True", timeout=60)
    yield name
    kube.delete("libvirthosts", name)


@pytest.fixture
def operator_log() -> Iterator[list[str]]:
    """Every log line the in-process operator (and kopf) emits during the test, DEBUG included."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                lines.append(self.format(record))
            except Exception:  # a record that cannot be formatted still must not hide its arguments
                lines.append(f"{record.msg!r} {record.args!r}")

    handler = Collect(level=logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield lines
    root.removeHandler(handler)
    root.setLevel(old_level)


def _pool(conn) -> Any:
    pool = conn.storagePoolLookupByName("default")
    pool.refresh(0)
    return pool


def _own_volumes(conn, uid: str) -> list[str]:
    return sorted(v for v in _pool(conn).listVolumes() if v.startswith(f"lvop-{uid}-"))


def _serial(libvirtd, obj: dict[str, Any]) -> Path:
    return libvirtd.root / "log" / "qemu" / f"{obj['status']['domainName']}-serial.log"


def _wait_guest_report(kube, path: Path, boots: int = 1) -> str:
    """The serial log once the guest finished its report `boots` times (the log is appended to)."""
    def done() -> str | None:
        text = path.read_text(errors="replace") if path.exists() else ""
        return text if text.count(DONE_MARKER) >= boots else None
    return kube.wait_for(done, timeout=BOOT_TIMEOUT, interval=0.5, what=f"guest report #{boots} on {path}")


def _last_boot(text: str) -> str:
    """The serial output of the last boot only."""
    return text[text.rfind(INIT_MARKER):]


def _request_restart(kube, namespace: str, name: str) -> None:
    request = {"action": "restart", "id": str(uuid.uuid4()), "requestedBy": "test",
               "requestedAt": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    kube.patch(VM, name, {"metadata": {"annotations": {
        "virt.libvirt-operator.io/action-request": json.dumps(request)}}}, namespace)


def test_inline_user_data_reaches_the_guest_on_a_backing_clone(kube, operator, namespace, libvirtd, host,
                                                               base_image) -> None:
    user_data = f"#cloud-config\n# {uuid.uuid4()}\nhostname: seeded\n"
    network = "version: 2\nethernets: {}\n"
    vm = kube.create(VM, {"metadata": {"name": "seeded"}, "spec": {
        "hostRef": host, "memory": "192Mi", "domainType": "qemu", "terminationGracePeriodSeconds": 1,
        "disks": [{"name": "root", "bootOrder": 1, "volume": {
            "source": {"volume": {"pool": "default", "name": BASE}}, "size": "64Mi"}}],
        "cloudInit": {"userData": user_data, "networkData": network}}}, namespace)
    uid = vm["metadata"]["uid"]
    obj = kube.wait_condition(VM, "seeded", "Ready", "True", namespace=namespace, timeout=90)
    text = _last_boot(_wait_guest_report(kube, _serial(libvirtd, obj)))

    # The guest read the seed we gave it, from a cdrom labelled cidata.
    assert serial_lines(text, "SEED-LABEL") == ["cidata"]
    assert serial_lines(text, "SEED-SHA256") == [_sha(user_data.encode())]
    assert serial_lines(text, "SEED-META") == [f"instance-id: {uid}", "local-hostname: seeded"]
    assert serial_lines(text, "SEED-NETWORK-SHA256") == [_sha(network.encode())]
    # It booted from its disk: the base's bytes through the overlay, grown to 64Mi.
    assert serial_lines(text, "DISK vda SHA256-1M") == [base_image["first_mib_sha"]]
    assert serial_lines(text, "DISK vda SECTORS") == [str(64 * 2**20 // 512)]

    volumes = {v["disk"]: v for v in obj["status"]["volumes"]}
    assert volumes["root"]["name"] == f"lvop-{uid}-root"
    first_seed = volumes["cloudInit"]["name"]
    assert first_seed.startswith(f"lvop-{uid}--cidata-")
    conn = libvirt.open(libvirtd.uri)
    try:
        pool = _pool(conn)
        root = ET.fromstring(pool.storageVolLookupByName(f"lvop-{uid}-root").XMLDesc(0))
        assert root.findtext("./backingStore/path") == str(base_image["path"])
        assert root.find("./backingStore/format").get("type") == "qcow2"
        assert root.find("./target/format").get("type") == "qcow2"
        assert int(root.findtext("./capacity")) == 64 * 2**20
        dom_xml = ET.fromstring(conn.lookupByUUIDString(uid).XMLDesc(0))
        seed_disk = dom_xml.find("./devices/disk[@device='cdrom']")
        assert seed_disk.find("readonly") is not None
        assert seed_disk.find("source").get("file").endswith(first_seed)

        # New user data: a new seed, RestartRequired; after a restart the guest reads the new one.
        new_data = user_data + "runcmd: [echo again]\n"
        kube.patch(VM, "seeded", {"spec": {"cloudInit": {"userData": new_data}}}, namespace)
        obj = kube.wait_for(lambda: (o := kube.get(VM, "seeded", namespace)) and
                            (condition(o, "RestartRequired") or {}).get("status") == "True" and o,
                            timeout=30, what="RestartRequired after a userData change")
        second_seed = {v["disk"]: v for v in obj["status"]["volumes"]}["cloudInit"]["name"]
        assert second_seed != first_seed
        assert {first_seed, second_seed} <= set(_own_volumes(conn, uid))  # the running guest keeps its seed
        _request_restart(kube, namespace, "seeded")
        text = _last_boot(_wait_guest_report(kube, _serial(libvirtd, obj), boots=2))
        assert serial_lines(text, "SEED-SHA256") == [_sha(new_data.encode())]
        kube.wait_for(lambda: condition(kube.get(VM, "seeded", namespace), "RestartRequired") is None,
                      timeout=30, what="RestartRequired cleared by the restart")

        kube.delete(VM, "seeded", namespace)
        kube.wait_for(lambda: kube.get(VM, "seeded", namespace) is None, timeout=60, what="VM deleted")
        assert _own_volumes(conn, uid) == []  # disk and both seeds gone
        assert BASE in _pool(conn).listVolumes()
        assert _sha(base_image["path"].read_bytes()) == base_image["sha"]  # the base never changed
    finally:
        conn.close()


def test_secret_user_data_on_a_full_clone_never_leaks(kube, operator, namespace, libvirtd, host, base_image,
                                                      operator_log) -> None:
    token = secrets.token_hex(16)
    value = f"#cloud-config\npassword: {token}\nchpasswd: {{expire: false}}\n".encode()
    kube.core.create_namespaced_secret(namespace, {"metadata": {"name": "web-userdata"},
                                                   "stringData": {"userdata": value.decode()}})
    vm = kube.create(VM, {"metadata": {"name": "secret-seed"}, "spec": {
        "hostRef": host, "memory": "192Mi", "domainType": "qemu",
        "disks": [{"name": "root", "bootOrder": 1, "volume": {
            "source": {"volume": {"pool": "default", "name": BASE}}, "clone": "full"}}],
        "cloudInit": {"userDataSecretRef": {"name": "web-userdata"}}}}, namespace)
    uid = vm["metadata"]["uid"]
    obj = kube.wait_condition(VM, "secret-seed", "Ready", "True", namespace=namespace, timeout=120)
    text = _last_boot(_wait_guest_report(kube, _serial(libvirtd, obj)))
    assert serial_lines(text, "SEED-SHA256") == [_sha(value)]
    assert serial_lines(text, "DISK vda SHA256-1M") == [base_image["first_mib_sha"]]
    assert serial_lines(text, "DISK vda SECTORS") == [str(-(-base_image["virtual_size"] // 512))]

    conn = libvirt.open(libvirtd.uri)
    try:
        root = ET.fromstring(_pool(conn).storageVolLookupByName(f"lvop-{uid}-root").XMLDesc(0))
        assert root.find("./backingStore") is None or not root.findtext("./backingStore/path")  # independent
        assert root.find("./target/format").get("type") == "qcow2"

        obj = kube.get(VM, "secret-seed", namespace)
        events = kube.events_for(namespace, "secret-seed")
        assert "CloudInitSeedCreated" in [e.reason for e in events]
        assert operator_log, "no operator log captured"
        for where, text_ in (("status", json.dumps(obj)), ("events", json.dumps([e.message for e in events])),
                             ("operator log", "\n".join(operator_log))):
            assert token not in text_, f"the Secret's value appears in the {where}"

        kube.delete(VM, "secret-seed", namespace)
        kube.wait_for(lambda: kube.get(VM, "secret-seed", namespace) is None, timeout=60, what="VM deleted")
        assert _own_volumes(conn, uid) == []
        assert _sha(base_image["path"].read_bytes()) == base_image["sha"]
    finally:
        conn.close()


def test_shrink_and_missing_base_are_refused_and_a_full_copy_grows(kube, operator, namespace, libvirtd, host,
                                                             base_image) -> None:
    cases = {
        "shrink": ({"source": {"volume": {"pool": "default", "name": BASE}}, "size": "1Mi"},
                   "VOLUME_SHRINK_REFUSED", "volumes are never shrunk"),
        "nobase": ({"source": {"volume": {"pool": "default", "name": "no-such-base.qcow2"}}},
                   "IMAGE_NOT_FOUND", "base volume no-such-base.qcow2 for disk root does not exist"),
    }
    uids = {}
    for name, (volume, _code, _text) in cases.items():
        uids[name] = kube.create(VM, {"metadata": {"name": name}, "spec": {
            "hostRef": host, "memory": "64Mi", "domainType": "qemu",
            "disks": [{"name": "root", "volume": volume}]}}, namespace)["metadata"]["uid"]
    conn = libvirt.open(libvirtd.uri)
    try:
        for name, (_volume, code, text) in cases.items():
            obj = kube.wait_for(lambda n=name: (o := kube.get(VM, n, namespace)) and
                                ((o.get("status") or {}).get("error") or {}).get("code") and o,
                                timeout=30, what=f"{name} refused")
            assert obj["status"]["error"]["code"] == code and text in obj["status"]["error"]["message"]
            assert obj["status"]["printableStatus"] == "Provisioning"
            assert _own_volumes(conn, uids[name]) == []  # nothing created
            with pytest.raises(libvirt.libvirtError):
                conn.lookupByUUIDString(uids[name])
        shrink = kube.get(VM, "shrink", namespace)
        assert condition(shrink, "Stalled")["status"] == "True"  # not retried until the spec changes

        # A full copy grown to its size (a Halted VM: created and defined, never booted).
        grown = kube.create(VM, {"metadata": {"name": "grown"}, "spec": {
            "hostRef": host, "memory": "64Mi", "domainType": "qemu", "runStrategy": "Halted",
            "disks": [{"name": "root", "volume": {"source": {"volume": {"pool": "default", "name": BASE}},
                                                  "clone": "full", "size": "48Mi"}}]}}, namespace)
        kube.wait_condition(VM, "grown", "Ready", "True", namespace=namespace, timeout=60)
        vol = _pool(conn).storageVolLookupByName(f"lvop-{grown['metadata']['uid']}-root")
        assert vol.info()[1] == 48 * 2**20
        assert not ET.fromstring(vol.XMLDesc(0)).findtext("./backingStore/path")
        cases["grown"] = cases["shrink"]
        uids["grown"] = grown["metadata"]["uid"]
        for name in cases:
            kube.delete(VM, name, namespace)
        for name in cases:
            kube.wait_for(lambda n=name: kube.get(VM, n, namespace) is None, timeout=60, what=f"{name} deleted")
        assert all(_own_volumes(conn, uid) == [] for uid in uids.values())
        assert _sha(base_image["path"].read_bytes()) == base_image["sha"]
    finally:
        conn.close()

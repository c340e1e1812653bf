"""The dev-time launchers (libvirt_operator.devenv) that `make run` and the test harness share."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest

from libvirt_operator.core.domain import METADATA_NS
from libvirt_operator.devenv import checkout
from libvirt_operator.devenv.controlplane import ControlPlaneUnavailable, ensure_binaries
from libvirt_operator.devenv.testhost import write_test_host

REPO = Path(__file__).resolve().parents[2]
DEVENV = REPO / "operator" / "libvirt_operator" / "devenv"


def test_the_checkout_is_found_from_the_package_itself(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(checkout.CHECKOUT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # not from the working directory
    assert checkout.find_checkout() == REPO


def test_without_a_checkout_dev_says_what_it_needs(tmp_path) -> None:
    env = {**os.environ, checkout.CHECKOUT_ENV: str(tmp_path), "LIBVIRT_OPERATOR_SKIP_RAG_INDEX": "1"}
    proc = subprocess.run([sys.executable, "-m", "libvirt_operator", "dev", "--workdir", str(tmp_path / "dev")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "is not a libvirt-operator source checkout" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "dev").exists()  # nothing started


def test_control_plane_binaries_without_a_checkout_name_the_two_ways_out(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("LIBVIRT_OPERATOR_CONTROLPLANE_BIN", raising=False)
    monkeypatch.setenv(checkout.CHECKOUT_ENV, str(tmp_path))
    with pytest.raises(ControlPlaneUnavailable, match=r"LIBVIRT_OPERATOR_CONTROLPLANE_BIN is not set"):
        ensure_binaries()


def test_every_data_file_the_launchers_read_is_packaged() -> None:
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["libvirt_operator"]
    data = [p.relative_to(DEVENV.parent).as_posix() for p in (DEVENV / "data").rglob("*") if p.is_file()]
    assert {"devenv/data/libvirtd-in-namespace.sh", "devenv/data/testiso/grub.cfg"} <= set(data)
    assert [f for f in data if not any(fnmatch.fnmatch(f, g) for g in globs)] == []


def test_a_test_driver_host_file_is_what_libvirt_reports(tmp_path) -> None:
    libvirt = pytest.importorskip("libvirt")
    owner = str(uuid.uuid4())
    uri = write_test_host(tmp_path / "h.xml", name="a--b <&>", cpus=6, memory_mib=3072, network=True, domains=[
        {"name": "on", "vcpus": 2, "memory_mib": 256,
         "metadata_xml": f"<lvop:vm xmlns:lvop='{METADATA_NS}'><lvop:uid>{owner}</lvop:uid></lvop:vm>"},
        {"name": "off", "running": False},
        "<domain type='test'><name>raw</name><memory unit='MiB'>64</memory><os><type>hvm</type></os></domain>",
    ])
    conn = libvirt.open(uri)
    try:
        info = conn.getInfo()
        assert (info[1], info[2]) == (3072, 6)
        states = {d.name(): d.isActive() for d in conn.listAllDomains()}
        assert states == {"on": 1, "off": 0, "raw": 1}
        assert owner in conn.lookupByName("on").metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
        pool = conn.storagePoolLookupByName("default")
        assert pool.isActive() and pool.info()[1] == 100 * 1024**3
        assert conn.networkLookupByName("default").isActive()
    finally:
        conn.close()

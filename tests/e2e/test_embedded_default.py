"""`libvirt-operator dev` (what `make run` starts) brings up the embedded default and tears it down."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.harness.kube import Kube

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    """A free port BELOW the kernel's ephemeral range: the control plane `dev` starts takes its ports
    from that range (bind to port 0) after we chose ours, and once took this very one (CI, cold run)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(max(1024, low - 12000), low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def _processes_under(path: Path) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(path) in cmd:
                found.append(cmd)
    return found


def test_dev_runs_the_operator_on_a_local_control_plane_and_libvirt_host(tmp_path, libvirtd) -> None:
    # (the libvirtd fixture makes sure a real daemon can run here, so the dev command uses one too)
    workdir = tmp_path / "dev"
    port = _free_port()
    log = (tmp_path / "dev.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "libvirt_operator", "dev", "--workdir", str(workdir),
                             "--metrics-port", str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "LIBVIRT_OPERATOR_SKIP_RAG_INDEX": "1"})
    try:
        kubeconfig = workdir / "controlplane" / "kubeconfig"
        Kube.wait_for(kubeconfig.exists, timeout=120, what="kubeconfig")
        kube = Kube(kubeconfig)
        host = kube.wait_condition("libvirthosts", "local", "Ready", "True", timeout=120)
        assert host["spec"]["uri"].startswith("qemu+tcp://127.0.0.1:")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for name in ("controller_runtime_reconcile_time_seconds", "controller_runtime_reconcile_total",
                     "controller_runtime_reconcile_errors_total"):
            assert name in metrics
        # The console through the local apiserver (the dev command registers the console API).
        kube.wait_condition("virtualmachines", "blank", "Ready", "True", namespace="default", timeout=120)
        console = subprocess.Popen([sys.executable, "-m", "libvirt_operator", "console", "default/blank",
                                    "--kubeconfig", str(kubeconfig)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
        Kube.wait_for(lambda: "console opened" in (tmp_path / "dev.log").read_text() or console.poll() is not None,
                      timeout=60, what="console opened")
        assert console.poll() is None, console.communicate()
        _out, err = console.communicate(b"\x1d", timeout=30)  # Ctrl-] quits
        assert console.returncode == 0, err
        output = (tmp_path / "dev.log").read_text()
        assert f"export KUBECONFIG={kubeconfig}" in output
        assert f"http://127.0.0.1:{port}/metrics" in output
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, (tmp_path / "dev.log").read_text()[-3000:]
    time.sleep(1)
    assert _processes_under(workdir) == [], "Ctrl-C left processes behind"

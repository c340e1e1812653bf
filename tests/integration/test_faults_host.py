"""Host-layer faults against the real operator process (`libvirt-operator run`, a subprocess) on a
private control plane of its own (so that stopping its apiserver or SIGTERM-ing the operator cannot
disturb the session's operator):

- a qemu+ssh host that accepts TCP and never answers: other hosts still become Ready, the hung host's
  status names the URI and the step, and SIGTERM ends the process within 10 s leaving no ssh behind;
  after a kill -9 instead, the next process removes the key and ssh the killed one left;
- an apiserver outage longer than kopf's patch retries (> 60 s): the host probe survives it and a
  daemon that dies afterwards turns the host NotReady;
- a daemon that dies turns its host NotReady at once (its connection's close callback), not at the
  next probe;
- a daemon that hangs (SIGSTOP) turns its host NotReady through libvirt's keepalive, and Ready again
  once it answers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.kube import Kube, condition
from tests.harness.operator_process import OperatorProcess
from tests.harness.sshd import keygen

@pytest.fixture
def operator_process(private_cp, tmp_path) -> Iterator[OperatorProcess]:
    op = OperatorProcess(private_cp.kubeconfig_path, tmp_path).start()
    yield op
    op.kill()


class SilentHost:
    """A TCP listener on loopback that accepts connections and never sends a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self._stop = True
        for s in [*self.accepted, self.sock]:
            s.close()


def _ssh_secret(kube: Kube, tmp_path: Path, port: int, prefix: str) -> tuple[str, Path]:
    """A new namespace with Secret `ssh`: a fresh client key and known_hosts for 127.0.0.1:port."""
    key = tmp_path / "id_key"
    keygen(key, "operator")
    ns = kube.new_namespace(prefix)
    kube.core.create_namespaced_secret(ns, {"metadata": {"name": "ssh"}, "stringData": {
        "ssh-privatekey": key.read_text(),
        "known_hosts": f"[127.0.0.1]:{port} " + " ".join(Path(f"{key}.pub").read_text().split()[:2])}})
    return ns, key


def _ssh_to(port: int) -> list[int]:
    """ssh processes the operator started (its wrapper's config lives in a lvop-cred- dir) to port."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if os.path.basename(argv[0]) == "ssh" and any("lvop-cred-" in a for a in argv) \
                and any(a == "-p" and b == str(port) for a, b in zip(argv, argv[1:])):
            found.append(int(pid))
    return found


def _wait(predicate, timeout: float, what: str, op: OperatorProcess):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        assert op.alive(), f"operator exited waiting for {what}:\n{op.tail()}"
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\noperator log:\n{op.tail()}")


@pytest.mark.parametrize("scheme", ["qemu+ssh", "qemu+tcp"])
def test_sigterm_stops_the_operator_within_10s_while_a_host_hangs(private_cp, operator_process, tmp_path,
                                                                 scheme) -> None:
    kube = Kube(private_cp.kubeconfig_path)
    silent = SilentHost()
    hung, healthy = f"hung-{uuid.uuid4().hex[:6]}", f"healthy-{uuid.uuid4().hex[:6]}"
    try:
        ns, _key = _ssh_secret(kube, tmp_path, silent.port, "hung")
        if scheme == "qemu+ssh":
            spec = {"uri": f"qemu+ssh://root@127.0.0.1:{silent.port}/system",
                    "credentialsSecretRef": {"name": "ssh", "namespace": ns}}
            shown = f"qemu+ssh://***@127.0.0.1:{silent.port}/system"  # the user is redacted like credentials
        else:  # no ssh in between: libvirt's own open blocks until the operator gives up on it
            spec = {"uri": f"qemu+tcp://127.0.0.1:{silent.port}/system", "insecure": True}
            shown = spec["uri"]
        kube.create("libvirthosts", {"metadata": {"name": hung}, "spec": spec})
        # a healthy host next to it: its probe must not queue behind the hung one
        kube.create("libvirthosts", {"metadata": {"name": healthy}, "spec": {"uri": "test:///default"}})

        def hung_reported():
            host = kube.get("libvirthosts", hung)
            ready = condition(host, "Ready") if host and host.get("status") else None
            return host if ready and ready["status"] == "False" else None

        host = _wait(hung_reported, 60, "the hung host's status", operator_process)
        ready = condition(host, "Ready")
        assert ready["reason"] == "HostUnreachable"
        # which URI hung, and at which step
        assert f"{shown} hung" in ready["message"], ready
        assert "step: connect" in ready["message"], ready
        assert host["status"]["error"]["context"]["step"] == "connect"
        assert "PRIVATE KEY" not in str(host["status"]), "a secret reached the status"
        _wait(lambda: (condition(kube.get("libvirthosts", healthy), "Ready") or {}).get("status") == "True",
              30, "the healthy host to be Ready", operator_process)

        if scheme == "qemu+ssh":  # SIGTERM while an ssh to the hung host is running
            _wait(lambda: _ssh_to(silent.port), 30, "an ssh child to the hung host", operator_process)
        else:  # SIGTERM while libvirt's open of the hung host is blocked
            _wait(lambda: silent.accepted, 30, "a connection to the hung host", operator_process)
        sent = time.monotonic()
        operator_process.proc.send_signal(signal.SIGTERM)
        try:
            operator_process.proc.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the operator did not exit within 10 s of SIGTERM:\n{operator_process.tail()}")
        took = time.monotonic() - sent
        time.sleep(0.5)
        assert _ssh_to(silent.port) == [], "an ssh process to the hung host outlived the operator"
        assert took <= 10
    finally:
        silent.close()
        for name in (hung, healthy):
            kube.delete("libvirthosts", name)


def _credential_dir_of(pid: int) -> Path | None:
    """The operator's credential directory an ssh process was started from (its -F config lives there)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    return next((Path(a).parent for a in argv if "/lvop-cred-" in a), None)


def test_the_key_and_ssh_a_killed_operator_left_are_removed_by_the_next_one(private_cp, operator_process,
                                                                            tmp_path) -> None:
    """kill -9 (an OOM kill, a node drain gone wrong) during the connect of a qemu+ssh host that never
    answers: nothing of that process cleans up, so its private key stays on disk (in a pod: the /tmp
    emptyDir, which outlives a container restart) and its ssh keeps running. The next operator process
    removes both before it connects anywhere; its own directory for the same host is another one."""
    kube = Kube(private_cp.kubeconfig_path)
    silent = SilentHost()
    name = f"hung-{uuid.uuid4().hex[:6]}"
    try:
        ns, key = _ssh_secret(kube, tmp_path, silent.port, "killed")
        kube.create("libvirthosts", {"metadata": {"name": name}, "spec": {
            "uri": f"qemu+ssh://root@127.0.0.1:{silent.port}/system",
            "credentialsSecretRef": {"name": "ssh", "namespace": ns}}})
        [ssh] = _wait(lambda: _ssh_to(silent.port), 60, "an ssh child to the hung host", operator_process)
        left = _credential_dir_of(ssh)
        assert left is not None and (left / "id_key").read_text() == key.read_text()

        operator_process.kill()
        time.sleep(1)
        assert _ssh_to(silent.port) == [ssh] and (left / "id_key").exists()  # what the kill leaves behind

        operator_process.start()
        _wait(lambda: not left.exists() and ssh not in _ssh_to(silent.port), 30,
              "the killed operator's key directory and ssh removed", operator_process)
        _wait(lambda: "removed credential directories" in operator_process.log_path.read_text(errors="replace"),
              10, "the removal logged", operator_process)
        assert str(left) not in operator_process.log_path.read_text(errors="replace")  # a count, never paths
        # the new process still serves the host: its own ssh, from its own directory
        [again] = _wait(lambda: _ssh_to(silent.port), 60, "the new operator's ssh to the hung host", operator_process)
        assert _credential_dir_of(again) not in (None, left)
    finally:
        silent.close()
        kube.delete("libvirthosts", name)


def test_host_probe_survives_an_apiserver_outage_longer_than_a_minute(private_cp, operator_process,
                                                                      libvirtd_factory) -> None:
    kube = Kube(private_cp.kubeconfig_path)
    daemon = libvirtd_factory("outage")
    try:
        kube.create("libvirthosts", {"metadata": {"name": "outage"},
                                     "spec": {"uri": daemon.uri, "insecure": True, "probeIntervalSeconds": 5}})
        _wait(lambda: (condition(kube.get("libvirthosts", "outage"), "Ready") or {}).get("status") == "True",
              60, "the host to be Ready", operator_process)
        private_cp.stop_apiserver()
        time.sleep(75)  # longer than kopf's patch retries (~60 s)
        private_cp.start_apiserver()
        time.sleep(10)  # the operator notices the apiserver is back
        daemon.stop()   # now the host dies: its status must say so
        host = _wait(lambda: (h := kube.get("libvirthosts", "outage")) and
                     (condition(h, "Ready") or {}).get("status") == "False" and h, 45,
                     "the host to turn NotReady after the outage", operator_process)
        assert condition(host, "Ready")["reason"] == "HostUnreachable"
    finally:
        if not private_cp.running or private_cp._apiserver is None:
            private_cp.start_apiserver()
        kube.delete("libvirthosts", "outage")


def test_a_dead_daemon_turns_its_host_notready_at_once(private_cp, operator_process, libvirtd_factory) -> None:
    kube = Kube(private_cp.kubeconfig_path)
    daemon = libvirtd_factory("dies")
    try:
        # default probe interval (30 s): only the lost connection can make it NotReady within seconds
        kube.create("libvirthosts", {"metadata": {"name": "dies"}, "spec": {"uri": daemon.uri, "insecure": True}})
        _wait(lambda: (condition(kube.get("libvirthosts", "dies"), "Ready") or {}).get("status") == "True",
              60, "the host to be Ready", operator_process)
        time.sleep(1)
        killed = time.monotonic()
        daemon.stop()
        host = _wait(lambda: (h := kube.get("libvirthosts", "dies")) and
                     (condition(h, "Ready") or {}).get("status") == "False" and h, 20,
                     "the host to turn NotReady", operator_process)
        took = time.monotonic() - killed
        assert took < 8, f"NotReady only after {took:.1f}s (the next probe, not the lost connection)"
        assert condition(host, "Ready")["reason"] == "HostUnreachable"
    finally:
        kube.delete("libvirthosts", "dies")


def test_a_frozen_daemon_turns_its_host_notready_by_keepalive_and_back(private_cp, operator_process,
                                                                       libvirtd_factory) -> None:
    kube = Kube(private_cp.kubeconfig_path)
    daemon = libvirtd_factory("frozen")
    name = f"frozen-{uuid.uuid4().hex[:6]}"
    pid = daemon.pid
    assert pid
    try:
        kube.create("libvirthosts", {"metadata": {"name": name}, "spec": {"uri": daemon.uri, "insecure": True}})
        _wait(lambda: (condition(kube.get("libvirthosts", name), "Ready") or {}).get("status") == "True",
              60, "the host to be Ready", operator_process)
        os.kill(pid, signal.SIGSTOP)  # the daemon hangs: the TCP connection stays, nothing answers
        frozen = time.monotonic()
        host = _wait(lambda: (h := kube.get("libvirthosts", name)) and
                     (condition(h, "Ready") or {}).get("status") == "False" and h, 45,
                     "the host to turn NotReady", operator_process)
        took = time.monotonic() - frozen
        message = condition(host, "Ready")["message"]
        assert "keepalive" in message and daemon.uri in message, message
        assert took < 30, f"NotReady only after {took:.0f}s"
        os.kill(pid, signal.SIGCONT)
        _wait(lambda: (condition(kube.get("libvirthosts", name), "Ready") or {}).get("status") == "True",
              60, "the host to be Ready again", operator_process)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        kube.delete("libvirthosts", name)

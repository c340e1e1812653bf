"""qemu+ssh:// against a real sshd on loopback in front of a real libvirtd: the Secret's
known_hosts is what ssh checks the host key against (strictly, always), failures say which key
is wrong, and no ssh process outlives its connection."""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirt_operator.adapters.libvirt import ConnectOptions, HostPool
from libvirt_operator.adapters.libvirt.events import ensure_event_thread
from libvirt_operator.adapters.libvirt.host_facts import probe_host
from libvirt_operator.core.errors import AppError, ErrorCode
from tests.harness.kube import condition
from tests.harness.sshd import SshServer, keygen, sshd_available


@pytest.fixture(scope="module")
def sshd(libvirtd, tmp_path_factory) -> Iterator[SshServer]:
    ok, reason = sshd_available()
    if not ok:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"sshd unavailable in CI: {reason}", pytrace=False)
        pytest.skip(f"sshd unavailable: {reason}")
    with SshServer(tmp_path_factory.mktemp("sshd"), daemon=libvirtd) as server:
        yield server


@pytest.fixture(scope="module")
def other_host_key(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("other-host") / "host_key"
    keygen(path, "some-other-host")
    return path


def _credentials(sshd: SshServer, known_hosts: str) -> dict[str, bytes]:
    return {"ssh-privatekey": sshd.client_key.read_bytes(), "known_hosts": known_hosts.encode()}


def _ssh_children() -> list[str]:
    """ssh processes started for the operator's connections (their config lives in a lvop-cred- dir)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "lvop-cred-" in cmd and "ssh" in cmd:
            found.append(f"{pid}: {cmd}")
    return found


async def _probe(uri: str, credentials: dict[str, bytes]) -> object:
    pool = HostPool()
    try:
        conn = await pool.ensure("ssh-host", ConnectOptions(uri=uri, credentials=credentials, call_timeout=30))
        return await conn.call("probe", probe_host)
    finally:
        await pool.close_all()


# qemu+ssh runs the ssh binary (through the operator's wrapper); libssh and libssh2 are in-process
# and need libvirt's event loop, which the operator registers at start.
TRANSPORTS = ["qemu+ssh", "qemu+libssh2", "qemu+libssh"]


@pytest.fixture(autouse=True)
def _libvirt_event_loop() -> None:
    ensure_event_thread()


@pytest.mark.parametrize("scheme", TRANSPORTS)
async def test_known_hosts_from_the_secret_lets_ssh_reach_the_daemon(sshd, libvirtd, scheme) -> None:
    pool = HostPool()
    conn = await pool.ensure("ssh-host", ConnectOptions(
        uri=sshd.uri().replace("qemu+ssh", scheme) + "?mode=legacy",
        credentials=_credentials(sshd, sshd.known_hosts()), call_timeout=30))
    facts = await conn.call("probe", probe_host)
    assert facts.hypervisor.startswith("QEMU ")
    # the private key left the disk once the connection was open (a SIGKILLed operator cleans up nothing)
    key_line = sshd.client_key.read_bytes().splitlines()[1]
    assert [p for p in Path(tempfile.gettempdir()).glob("lvop-cred-*/*") if key_line in p.read_bytes()] == []
    # ... and the open connection goes on working without it;
    # it is the harness daemon behind sshd: its pool lives under the daemon's root
    pool_xml = await conn.call("pool", lambda c: c.storagePoolLookupByName("default").XMLDesc())
    assert str(libvirtd.pool_path) in pool_xml
    if scheme == "qemu+ssh":
        assert _ssh_children(), "the connection runs through the operator's ssh wrapper"
    await pool.close_all()
    deadline = time.monotonic() + 5
    while _ssh_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ssh_children() == [], "ssh outlived its connection"


@pytest.mark.parametrize("scheme", TRANSPORTS)
async def test_host_key_mismatch_is_host_auth_failed(sshd, other_host_key, scheme) -> None:
    with pytest.raises(AppError) as info:
        await _probe(sshd.uri().replace("qemu+ssh", scheme), _credentials(sshd, sshd.known_hosts(other_host_key)))
    assert info.value.code == ErrorCode.HOST_AUTH_FAILED
    assert info.value.message.startswith(f"host key mismatch for 127.0.0.1:{sshd.port}")
    assert "lvop-cred-" not in info.value.message  # no paths of the operator's private files
    assert _ssh_children() == []


@pytest.mark.parametrize("scheme", TRANSPORTS)
async def test_host_missing_from_known_hosts_is_refused_even_if_the_key_is_known_elsewhere(sshd, scheme) -> None:
    # the right key, but recorded for another port: strict checking never falls back to other entries
    wrong_port = sshd.known_hosts().replace(f"]:{sshd.port} ", "]:1 ")
    with pytest.raises(AppError) as info:
        await _probe(sshd.uri().replace("qemu+ssh", scheme), _credentials(sshd, wrong_port))
    assert info.value.code == ErrorCode.HOST_AUTH_FAILED
    assert f"host key mismatch for 127.0.0.1:{sshd.port}" in info.value.message
    assert "has no key for it" in info.value.message


async def test_unauthorized_client_key_is_host_auth_failed(sshd, tmp_path) -> None:
    keygen(tmp_path / "stranger", "stranger")
    creds = {"ssh-privatekey": (tmp_path / "stranger").read_bytes(), "known_hosts": sshd.known_hosts().encode()}
    with pytest.raises(AppError) as info:
        await _probe(sshd.uri(), creds)
    assert info.value.code == ErrorCode.HOST_AUTH_FAILED
    assert "refused the ssh key" in info.value.message and "Permission denied (publickey)" in info.value.message


async def test_ssh_key_without_known_hosts_is_refused_naming_the_keys(sshd) -> None:
    with pytest.raises(AppError) as info:
        await _probe(sshd.uri(), {"ssh-privatekey": sshd.client_key.read_bytes()})
    assert info.value.code == ErrorCode.CREDENTIALS_NOT_FOUND
    assert "has no key known_hosts" in info.value.message
    assert "expected keys ssh-privatekey, known_hosts; found keys: ssh-privatekey" in info.value.message


def test_libvirthost_over_ssh_is_ready_and_a_wrong_key_is_reported(kube, operator, namespace, sshd,
                                                                     other_host_key) -> None:
    from kubernetes import client

    for secret, known_hosts in (("good", sshd.known_hosts()), ("bad", sshd.known_hosts(other_host_key))):
        kube.core.create_namespaced_secret(namespace, client.V1Secret(
            metadata=client.V1ObjectMeta(name=secret), type="kubernetes.io/ssh-auth",
            string_data={"ssh-privatekey": sshd.client_key.read_text(), "known_hosts": known_hosts}))
    good, bad = f"ssh-good-{uuid.uuid4().hex[:6]}", f"ssh-bad-{uuid.uuid4().hex[:6]}"
    for name, secret in ((good, "good"), (bad, "bad")):
        kube.create("libvirthosts", {"metadata": {"name": name}, "spec": {
            "uri": sshd.uri() + "?proxy=native", "credentialsSecretRef": {"name": secret, "namespace": namespace}}})
    host = kube.wait_condition("libvirthosts", good, "Ready", "True", timeout=60)
    assert host["status"]["hypervisor"].startswith("QEMU ")
    host = kube.wait_condition("libvirthosts", bad, "Ready", "False", timeout=60)
    ready = condition(host, "Ready")
    assert ready["reason"] == "HostAuthFailed"
    assert f"host key mismatch for 127.0.0.1:{sshd.port}" in ready["message"]
    assert host["status"]["error"]["code"] == "HOST_AUTH_FAILED"
    assert _ssh_children(), "the Ready host keeps its ssh connection open"
    for name in (good, bad):
        kube.delete("libvirthosts", name)
    kube.wait_for(lambda: _ssh_children() == [], timeout=30, what="ssh to exit after the host is deleted")

"""The serial console through the Kubernetes API (`libvirt-operator console ns/vm`), end to end: the real
kube-apiserver as front proxy (aggregated API, ExternalName Service to the in-process operator's
console server), RBAC decided by SubjectAccessReviews, users with their own client certificates, the
real CLI as a subprocess, and a real libvirtd running the test ISO."""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prometheus_client import REGISTRY

from libvirt_operator.core.api.common import SUBRESOURCES_GROUP, SUBRESOURCES_GROUP_VERSION
from libvirt_operator.handlers.startup import CONSOLE_SERVER_KEY, current_memo
from tests.harness.kube import REPO, Kube, cert_kubeconfig
from tests.harness.libvirt_module import libvirt
from tests.harness.pytest_operator import CONSOLE_SERVICE, CONSOLE_SERVICE_NAMESPACE

VM = "virtualmachines"
APISERVICE = f"v1alpha1.{SUBRESOURCES_GROUP}"
CONSOLE_ROLE = "libvirt-operator-console"
MODULE_LOADED = time.time() - 1  # before the operator fixture starts the console server


def opened_consoles(host: str) -> float:
    return REGISTRY.get_sample_value("libvirt_operator_libvirt_calls_total",
                                     {"host": host, "operation": "open-console", "outcome": "ok"}) or 0.0


def manifest(kind: str, name: str) -> dict[str, Any]:
    docs = yaml.safe_load_all((REPO / "manifests" / "deploy" / "70-console-api.yaml").read_text())
    return next(d for d in docs if d and d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.fixture(scope="module")
def console_api(kube: Kube, operator: Any) -> int:
    """Register the operator's console server as the aggregated API, as the deploy manifests do, but
    with an ExternalName Service to localhost (the aggregator refuses loopback Endpoints) and the
    caBundle of the operator's self-signed cert (so the apiserver verifies it here)."""
    server = current_memo()[CONSOLE_SERVER_KEY]
    port = server.port
    ca_bundle = server.cert_pem
    with_retry = {"metadata": {"name": CONSOLE_SERVICE, "namespace": CONSOLE_SERVICE_NAMESPACE},
                  "spec": {"type": "ExternalName", "externalName": "localhost", "ports": [{"port": port}]}}
    try:
        kube.core.delete_namespaced_service(CONSOLE_SERVICE, CONSOLE_SERVICE_NAMESPACE)
    except ApiException:
        pass
    kube.core.create_namespaced_service(CONSOLE_SERVICE_NAMESPACE, with_retry)
    apis = client.ApiregistrationV1Api(kube.api)
    body = manifest("APIService", APISERVICE)
    body["spec"].pop("insecureSkipTLSVerify")
    body["spec"]["caBundle"] = __import__("base64").b64encode(ca_bundle).decode()
    body["spec"]["service"] = {"name": CONSOLE_SERVICE, "namespace": CONSOLE_SERVICE_NAMESPACE, "port": port}
    try:
        apis.delete_api_service(APISERVICE)
    except ApiException:
        pass
    apis.create_api_service(body)
    rbac = client.RbacAuthorizationV1Api(kube.api)
    try:
        rbac.create_cluster_role(manifest("ClusterRole", CONSOLE_ROLE))
    except ApiException as err:
        if err.status != 409:
            raise

    def available() -> bool:
        conds = apis.read_api_service(APISERVICE).status.conditions or []
        return any(c.type == "Available" and c.status == "True" for c in conds)

    kube.wait_for(available, timeout=60, what="APIService Available")
    yield port
    apis.delete_api_service(APISERVICE)
    kube.core.delete_namespaced_service(CONSOLE_SERVICE, CONSOLE_SERVICE_NAMESPACE)


def user_kubeconfig(controlplane: Any, user: str, directory: Path) -> Path:
    return cert_kubeconfig(controlplane, user, "console-testers", directory)


def token_kubeconfig(kube: Kube, controlplane: Any, namespace: str, account: str, directory: Path) -> Path:
    """A kubeconfig with a bearer token of a ServiceAccount (TokenRequest), as a CI job would have."""
    kube.core.create_namespaced_service_account(namespace, {"metadata": {"name": account}})
    token = kube.core.create_namespaced_service_account_token(
        account, namespace, {"spec": {"expirationSeconds": 3600}}).status.token
    import base64

    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": account,
           "clusters": [{"name": "envtest", "cluster": {
               "server": controlplane.server_url,
               "certificate-authority-data": base64.b64encode(controlplane.ca_cert_path.read_bytes()).decode()}}],
           "users": [{"name": account, "user": {"token": token}}],
           "contexts": [{"name": account, "context": {"cluster": "envtest", "user": account}}]}
    path = directory / f"{account}.kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path


def bind_console(kube: Kube, namespace: str, user: str, kind: str = "User") -> None:
    subject = ({"kind": "ServiceAccount", "name": user, "namespace": namespace} if kind == "ServiceAccount"
               else {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user})
    client.RbacAuthorizationV1Api(kube.api).create_namespaced_role_binding(namespace, {
        "metadata": {"name": f"console-{user}"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CONSOLE_ROLE},
        "subjects": [subject]})


class ConsoleProcess:
    """The real CLI, its output collected by a thread."""

    def __init__(self, kubeconfig: Path, target: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "libvirt_operator", "console", target,
                                      "--kubeconfig", str(kubeconfig)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ})
        self.out = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(4096):
            self.out.extend(chunk)

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def finish(self, timeout: float = 20) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read().decode(errors="replace")


def run_console(kubeconfig: Path, target: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "libvirt_operator", "console", target, "--kubeconfig", str(kubeconfig)],
                          input="", capture_output=True, text=True, timeout=timeout, env={**os.environ})


@pytest.fixture
def iso_downloads(operator: Any, tmp_path: Path):
    import dataclasses
    import ipaddress

    rt = operator.runtime
    original = rt.settings
    rt.settings = dataclasses.replace(original, iso_cache_dir=str(tmp_path / "iso-cache"),
                                      download_allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    yield
    rt.settings = original


def test_a_user_bound_to_the_console_role_reads_the_guest_serial_output_and_others_are_refused(
        kube, operator, namespace, libvirtd, test_iso, iso_downloads, console_api, controlplane, tmp_path) -> None:
    from tests.harness.http_server import TestHTTPServer

    host = f"console-{uuid.uuid4().hex[:6]}"
    kube.create("libvirthosts", {"metadata": {"name": host}, "spec": {"uri": libvirtd.uri, "insecure": True}})
    kube.wait_condition("libvirthosts", host, "Ready", "True", timeout=60)
    sha = hashlib.sha256(test_iso.path.read_bytes()).hexdigest()
    with TestHTTPServer(test_iso.path) as http:
        kube.create("isoimages", {"kind": "ISOImage", "metadata": {"name": "bootiso"}, "spec": {
            "source": {"url": http.url("/image")}, "checksum": f"sha256:{sha}",
            "targets": {"hostNames": [host]}}}, namespace)
        kube.create(VM, {"metadata": {"name": "guest"}, "spec": {
            "hostRef": host, "memory": "64Mi", "domainType": "qemu",
            "disks": [{"name": "media", "bootOrder": 1, "cdrom": {"isoImageRef": {"name": "bootiso"}}}]}}, namespace)
        vm = kube.wait_condition(VM, "guest", "Ready", "True", namespace=namespace, timeout=120)
    alice = user_kubeconfig(controlplane, "alice", tmp_path)
    bob = user_kubeconfig(controlplane, "bob", tmp_path)
    bind_console(kube, namespace, "alice")

    # bob has no binding: refused by the cluster's RBAC, and the operator never opened the console.
    before = opened_consoles(host)
    refused = run_console(bob, f"{namespace}/guest")
    assert refused.returncode != 0
    assert "forbidden" in refused.stderr and 'User "bob"' in refused.stderr, refused.stderr
    assert opened_consoles(host) == before

    # alice reads what the guest prints: reset it (a new boot on the same QEMU, so the console stays)
    # once she is attached, and both markers of the test ISO come through the apiserver.
    session = ConsoleProcess(alice, f"{namespace}/guest")
    kube.wait_for(lambda: opened_consoles(host) > before or session.proc.poll() is not None, timeout=30,
                  what="console opened")
    assert session.proc.poll() is None, session.finish()
    conn = libvirt.open(libvirtd.uri)
    try:
        conn.lookupByUUIDString(vm["metadata"]["uid"]).reset()
    finally:
        conn.close()
    started = time.monotonic()
    kube.wait_for(lambda: all(m.encode() in session.out for m in test_iso.markers) or session.proc.poll() is not None,
                  timeout=30, what="boot markers on the console")
    assert all(m.encode() in session.out for m in test_iso.markers), (bytes(session.out), session.finish())
    print(f"measured: reset to both markers through the apiserver {time.monotonic() - started:.2f}s")
    session.send(b"typed before quitting\x1d")  # Ctrl-] quits, as in virsh console
    code, err = session.finish()
    assert code == 0, err
    assert "alice" not in err and "BEGIN" not in err  # no credentials echoed

    # On a terminal: raw mode (Ctrl-] reaches the CLI as a byte, not a signal) and restored afterwards.
    import pty
    import termios

    controller, terminal = pty.openpty()
    cooked = termios.tcgetattr(terminal)
    on_tty = subprocess.Popen([sys.executable, "-m", "libvirt_operator", "console", f"{namespace}/guest",
                               "--kubeconfig", str(alice)], stdin=terminal, stdout=terminal,
                              stderr=subprocess.PIPE, env={**os.environ})
    try:
        kube.wait_for(lambda: termios.tcgetattr(terminal)[3] & termios.ICANON == 0 or on_tty.poll() is not None,
                      timeout=30, what="terminal in raw mode")
        assert on_tty.poll() is None, on_tty.communicate()
        os.write(controller, b"\x1d")
        assert on_tty.wait(20) == 0
        assert b"escape character is ^]" in on_tty.stderr.read()
        assert termios.tcgetattr(terminal) == cooked
    finally:
        if on_tty.poll() is None:
            on_tty.kill()
        os.close(controller)
        os.close(terminal)

    missing = run_console(alice, f"{namespace}/nope")
    assert missing.returncode != 0 and "not found" in missing.stderr, missing.stderr
    kube.delete(VM, "guest", namespace)
    kube.wait_for(lambda: kube.get(VM, "guest", namespace) is None, timeout=60, what="VM deleted")
    kube.delete("isoimages", "bootiso", namespace)
    kube.delete("libvirthosts", host)


def test_a_vm_on_a_host_without_console_support_gets_a_clear_error(
        kube, operator, namespace, test_host_factory, console_api, controlplane, tmp_path) -> None:
    host = f"noconsole-{uuid.uuid4().hex[:6]}"
    kube.create("libvirthosts", {"metadata": {"name": host},
                                 "spec": {"uri": test_host_factory(host, cpus=4, memory_mib=4096)}})
    kube.wait_condition("libvirthosts", host, "Ready", "True", timeout=30)
    kube.create(VM, {"metadata": {"name": "vm"}, "spec": {"hostRef": host, "memory": "128Mi"}}, namespace)
    kube.wait_condition(VM, "vm", "Ready", "True", namespace=namespace, timeout=30)
    # (a ServiceAccount's bearer token this time: the CLI's other way to authenticate)
    carol = token_kubeconfig(kube, controlplane, namespace, "carol", tmp_path)
    bind_console(kube, namespace, "carol", kind="ServiceAccount")
    started = time.monotonic()
    done = run_console(carol, f"{namespace}/vm")
    assert done.returncode != 0
    assert "no console support" in done.stderr, done.stderr
    assert time.monotonic() - started < 20
    kube.delete(VM, "vm", namespace)
    kube.wait_for(lambda: kube.get(VM, "vm", namespace) is None, timeout=30, what="VM deleted")
    kube.delete("libvirthosts", host)


def test_the_generated_serving_key_is_in_no_file(console_api) -> None:
    """The self-signed serving cert's key lives in the TLS context only: its directory went at start."""
    left = [d for d in Path(tempfile.gettempdir()).glob("lvop-console-tls-*") if d.stat().st_ctime >= MODULE_LOADED]
    assert left == [], f"the console's generated key was left on disk: {left}"


def test_requests_that_bypass_the_apiserver_are_refused(console_api, controlplane) -> None:
    url = (f"https://127.0.0.1:{console_api}/apis/{SUBRESOURCES_GROUP_VERSION}/namespaces/default/"
           "virtualmachines/any/console")
    # No client certificate, a forged user header: 401, whatever the header claims.
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
    request = urllib.request.Request(url, headers={"X-Remote-User": "system:admin", "X-Remote-Group": "system:masters"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, context=insecure, timeout=10)
    assert refused.value.code == 401
    assert b"front-proxy client certificate" in refused.value.read()
    # A client cert from the cluster CA (a user's, here the admin's) is not the front proxy's: the TLS
    # handshake fails.
    admin = ssl.create_default_context()
    admin.check_hostname, admin.verify_mode = False, ssl.CERT_NONE
    admin.load_cert_chain(str(controlplane.client_cert_path), str(controlplane.client_key_path))
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionResetError)):
        urllib.request.urlopen(urllib.request.Request(url, headers={"X-Remote-User": "admin"}), context=admin,
                               timeout=10)


def test_the_operator_authorises_each_console_itself(console_api, controlplane) -> None:
    """The apiserver already refuses users without the role before proxying; the operator asks again
    (SubjectAccessReview), so that whoever holds the front proxy's certificate still gets only what
    RBAC allows. Called here with that certificate directly, naming a user without the role."""
    url = (f"https://127.0.0.1:{console_api}/apis/{SUBRESOURCES_GROUP_VERSION}/namespaces/default/"
           "virtualmachines/any/console")
    proxy = ssl.create_default_context()
    proxy.check_hostname, proxy.verify_mode = False, ssl.CERT_NONE
    proxy.load_cert_chain(str(controlplane.cert_dir / "front-proxy-client.crt"),
                          str(controlplane.cert_dir / "front-proxy-client.key"))
    request = urllib.request.Request(url, headers={"X-Remote-User": "mallory", "X-Remote-Group": "system:authenticated"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, context=proxy, timeout=10)
    assert refused.value.code == 403
    body = json.loads(refused.value.read())
    assert body["kind"] == "Status" and body["reason"] == "Forbidden" and 'User "mallory"' in body["message"]
    # The front proxy's cert without a user: 401.
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(urllib.request.Request(url), context=proxy, timeout=10)
    assert anonymous.value.code == 401

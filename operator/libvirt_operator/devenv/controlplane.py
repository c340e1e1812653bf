"""A throw-away Kubernetes control plane (etcd + kube-apiserver): the embedded default's and the tests'.

This is the "envtest" pattern: no kubelet, no controllers (so no garbage
collection, namespaces stay ``Terminating``), just a real API server with real
CRD/OpenAPI/CEL validation, RBAC and admission, backed by a private etcd.

The binaries are built from source by ``hack/ensure-controlplane.sh`` of the source
checkout (cached under ``~/.cache/libvirt-operator/controlplane/<key>/``), or taken from
the directory named by ``$LIBVIRT_OPERATOR_CONTROLPLANE_BIN`` (then no checkout is needed).

Usage::

    with ControlPlane(workdir) as cp:
        ...  # cp.kubeconfig_path, cp.server_url

or, from a dev script that keeps it running until killed::

    cp = start_controlplane(Path("/tmp/cp"))
    print(cp.kubeconfig_path)
    signal.sigwait({signal.SIGINT, signal.SIGTERM})
    cp.stop()

Everything listens on 127.0.0.1 only.  The child processes get
``PR_SET_PDEATHSIG=SIGTERM`` so they do not outlive the Python process that
started them (note: this is tied to the *thread* that called ``start()``).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .checkout import CheckoutNotFound, find_checkout

__all__ = [
    "BIN_DIR_ENV",
    "ControlPlane",
    "ControlPlaneError",
    "ControlPlaneUnavailable",
    "ensure_binaries",
    "start_controlplane",
]

BIN_DIR_ENV = "LIBVIRT_OPERATOR_CONTROLPLANE_BIN"

_SERVICE_CIDR = "10.0.0.0/24"
FRONT_PROXY_CLIENT_CN = "front-proxy-client"
_LOG_TAIL_LINES = 40


class ControlPlaneError(RuntimeError):
    """The control plane could not be built or started."""


class ControlPlaneUnavailable(ControlPlaneError):
    """A prerequisite is missing (no Go toolchain and no prebuilt binaries)."""


# --------------------------------------------------------------------------- binaries


def ensure_binaries(*, timeout: float | None = 3600) -> Path:
    """Return the directory holding ``kube-apiserver`` and ``etcd``.

    Uses ``$LIBVIRT_OPERATOR_CONTROLPLANE_BIN`` if set, otherwise runs
    ``hack/ensure-controlplane.sh`` (which builds them once, minutes when cold).
    """
    env_dir = os.environ.get(BIN_DIR_ENV)
    if env_dir:
        bin_dir = Path(env_dir)
    else:
        try:
            ensure_script = find_checkout() / "hack" / "ensure-controlplane.sh"
        except CheckoutNotFound as exc:
            raise ControlPlaneUnavailable(f"no kube-apiserver/etcd: ${BIN_DIR_ENV} is not set and {exc}") from None
        if shutil.which("go") is None:
            raise ControlPlaneUnavailable(
                f"'go' is not in PATH and ${BIN_DIR_ENV} is not set: "
                "cannot build kube-apiserver/etcd (hack/ensure-controlplane.sh needs Go >= 1.24)"
            )
        # stderr is inherited so that build progress is visible (pytest -s).
        proc = subprocess.run(
            ["bash", str(ensure_script)],
            stdout=subprocess.PIPE,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode == 127:
            raise ControlPlaneUnavailable(f"{ensure_script} could not find its tools (exit 127)")
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise ControlPlaneError(
                f"{ensure_script} failed with exit code {proc.returncode}; see its stderr above"
            )
        bin_dir = Path(lines[-1])
    for name in ("kube-apiserver", "etcd"):
        if not os.access(bin_dir / name, os.X_OK):
            raise ControlPlaneUnavailable(f"{bin_dir / name} is missing or not executable")
    return bin_dir


# --------------------------------------------------------------------------- PKI


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = []
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _issue(
    *,
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    is_ca: bool = False,
    eku: Sequence[x509.ObjectIdentifier] = (),
    sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # gRPC (etcd client) and Go's HTTP stack honour proxy variables: keep loopback direct.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(var, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost,::1"
    env.pop("KUBECONFIG", None)
    return env


# --------------------------------------------------------------------------- control plane


class ControlPlane:
    """etcd + kube-apiserver on loopback, with an admin kubeconfig.

    ``workdir`` receives ``etcd.log``, ``kube-apiserver.log``, ``kubeconfig``,
    ``certs/`` and ``etcd-data/``.  On ``stop()`` the processes are terminated
    (SIGTERM, then SIGKILL) and ``etcd-data/`` and ``certs/`` are removed; the
    logs stay (the kubeconfig too, but it is useless once stopped).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        bin_dir: Path | None = None,
        startup_timeout: float = 90.0,
        extra_apiserver_args: Sequence[str] = (),
        extra_etcd_args: Sequence[str] = (),
        cleanup: bool = True,
        die_with_parent: bool = True,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self._bin_dir = Path(bin_dir) if bin_dir is not None else None
        self.startup_timeout = startup_timeout
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.extra_etcd_args = list(extra_etcd_args)
        self.cleanup = cleanup
        self.die_with_parent = die_with_parent

        self.cert_dir = self.workdir / "certs"
        self.etcd_data_dir = self.workdir / "etcd-data"
        self.etcd_log_path = self.workdir / "etcd.log"
        self.apiserver_log_path = self.workdir / "kube-apiserver.log"
        self.kubeconfig_path = self.workdir / "kubeconfig"
        self.ca_cert_path = self.cert_dir / "ca.crt"
        self.client_cert_path = self.cert_dir / "admin.crt"
        self.client_key_path = self.cert_dir / "admin.key"

        self.etcd_url: str = ""
        self.server_url: str = ""
        self.secure_port: int = 0
        #: seconds from spawning kube-apiserver until /readyz answered "ok"
        self.apiserver_ready_seconds: float | None = None

        self._etcd: subprocess.Popen[bytes] | None = None
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._apiserver_args: list[str] = []
        self._log_files: list = []

    # -- context manager -------------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ControlPlane {self.server_url or 'not started'} workdir={self.workdir}>"

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return any(p is not None and p.poll() is None for p in (self._etcd, self._apiserver))

    def start(self) -> ControlPlane:
        if self.running:
            raise ControlPlaneError("control plane already running")
        bin_dir = self._bin_dir or ensure_binaries()
        self._bin_dir = bin_dir
        self.workdir.mkdir(parents=True, exist_ok=True)

        attempts = 3  # free-port selection can race with other processes
        for attempt in range(1, attempts + 1):
            try:
                self._start_once(bin_dir)
                return self
            except ControlPlaneError as exc:
                self.stop()
                if attempt < attempts and "address already in use" in str(exc):
                    continue
                raise
        raise AssertionError("unreachable")

    def _start_once(self, bin_dir: Path) -> None:
        for d in (self.cert_dir, self.etcd_data_dir):
            shutil.rmtree(d, ignore_errors=True)
        self.cert_dir.mkdir(mode=0o700)
        self.etcd_data_dir.mkdir(mode=0o700)

        etcd_client_port, etcd_peer_port, self.secure_port = _free_port(), _free_port(), _free_port()
        while len({etcd_client_port, etcd_peer_port, self.secure_port}) < 3:
            etcd_peer_port, self.secure_port = _free_port(), _free_port()
        self.etcd_url = f"http://127.0.0.1:{etcd_client_port}"
        self.server_url = f"https://127.0.0.1:{self.secure_port}"
        peer_url = f"http://127.0.0.1:{etcd_peer_port}"

        pki = self._write_pki()

        # ---- etcd
        etcd_args = [
            str(bin_dir / "etcd"),
            "--name=default",
            f"--data-dir={self.etcd_data_dir}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            "--unsafe-no-fsync",
            "--log-level=warn",
            *self.extra_etcd_args,
        ]
        self._etcd = self._spawn(etcd_args, self.etcd_log_path)
        self._wait(
            "etcd",
            lambda: self._http_ok(f"{self.etcd_url}/health", expect=b'"health":"true"'),
            deadline=time.monotonic() + 30,
        )

        # ---- kube-apiserver
        apiserver_args = [
            str(bin_dir / "kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            f"--cert-dir={self.cert_dir}",
            f"--tls-cert-file={pki['serving_crt']}",
            f"--tls-private-key-file={pki['serving_key']}",
            f"--client-ca-file={pki['ca_crt']}",
            f"--secure-port={self.secure_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            # No kubelets/nodes: don't maintain the `kubernetes` Endpoints (an advertise
            # address on loopback is not a valid endpoint anyway).
            "--endpoint-reconciler-type=none",
            f"--service-cluster-ip-range={_SERVICE_CIDR}",
            "--allow-privileged=true",
            "--disable-admission-plugins=ServiceAccount",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={self.server_url}",
            f"--service-account-key-file={pki['sa_pub']}",
            f"--service-account-signing-key-file={pki['sa_key']}",
            # The front proxy (kube-aggregator): how aggregated APIs (the operator's console
            # subresource) learn who the caller is. The apiserver presents the proxy client cert and
            # sets X-Remote-*; the extension server trusts only certs from the requestheader CA.
            # No --enable-aggregator-routing: the default (service) routing is the one that follows
            # an ExternalName Service to localhost, which the tests use to reach an in-process server.
            f"--requestheader-client-ca-file={pki['front_proxy_ca_crt']}",
            f"--requestheader-allowed-names={FRONT_PROXY_CLIENT_CN}",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki['front_proxy_client_crt']}",
            f"--proxy-client-key-file={pki['front_proxy_client_key']}",
            "--profiling=false",
            *self.extra_apiserver_args,
        ]
        self._apiserver_args = apiserver_args
        self._spawn_apiserver()
        self._write_kubeconfig(pki)

    def _spawn_apiserver(self) -> None:
        spawned = time.monotonic()
        self._apiserver = self._spawn(self._apiserver_args, self.apiserver_log_path)
        ctx = self.ssl_context()
        self._wait(
            "kube-apiserver",
            lambda: self._http_ok(f"{self.server_url}/readyz", ctx=ctx, expect=b"ok"),
            deadline=spawned + self.startup_timeout,
        )
        self.apiserver_ready_seconds = time.monotonic() - spawned

    # -- faults (an apiserver outage; etcd and the data stay) --------------------------------

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver only (SIGTERM, then SIGKILL): clients get connection refused until
        :meth:`start_apiserver`. etcd, the certificates and the kubeconfig stay as they are."""
        if self._apiserver is not None:
            _terminate(self._apiserver)
            self._apiserver = None

    def start_apiserver(self) -> None:
        """Start kube-apiserver again after :meth:`stop_apiserver`: same port, certificates and data,
        so existing kubeconfigs and clients work again."""
        if self._apiserver is not None and self._apiserver.poll() is None:
            raise ControlPlaneError("kube-apiserver already running")
        if not self._apiserver_args:
            raise ControlPlaneError("the control plane was never started")
        self._spawn_apiserver()

    def stop(self) -> None:
        """Stop kube-apiserver, then etcd (SIGTERM, then SIGKILL); remove temp dirs."""
        for attr in ("_apiserver", "_etcd"):
            proc: subprocess.Popen[bytes] | None = getattr(self, attr)
            if proc is not None:
                _terminate(proc)
                setattr(self, attr, None)
        for f in self._log_files:
            with contextlib.suppress(OSError):
                f.close()
        self._log_files.clear()
        if self.cleanup:
            for d in (self.etcd_data_dir, self.cert_dir):
                shutil.rmtree(d, ignore_errors=True)

    # -- client helpers ----------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """An SSL context that trusts the cluster CA and presents the admin cert."""
        ctx = ssl.create_default_context(cafile=str(self.ca_cert_path))
        ctx.load_cert_chain(str(self.client_cert_path), str(self.client_key_path))
        return ctx

    def log_tails(self, lines: int = _LOG_TAIL_LINES) -> str:
        return (
            f"--- {self.etcd_log_path} (last {lines} lines)\n{_tail(self.etcd_log_path, lines)}\n"
            f"--- {self.apiserver_log_path} (last {lines} lines)\n"
            f"{_tail(self.apiserver_log_path, lines)}"
        )

    # -- internals ---------------------------------------------------------------------

    def _spawn(self, args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(args)}\n".encode())
        log.flush()
        self._log_files.append(log)
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=_child_env(),
            start_new_session=True,  # a Ctrl-C in the terminal goes to us, and we stop them
            preexec_fn=_die_with_parent if self.die_with_parent else None,  # noqa: PLW1509
        )

    def _wait(self, what: str, probe, *, deadline: float) -> None:
        last_err = ""
        while True:
            for name, proc in (("etcd", self._etcd), ("kube-apiserver", self._apiserver)):
                if proc is not None and proc.poll() is not None:
                    raise ControlPlaneError(
                        f"{name} exited with code {proc.returncode} while waiting for {what}\n"
                        + self.log_tails()
                    )
            try:
                if probe():
                    return
            except Exception as exc:  # noqa: BLE001 - keep polling
                last_err = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"timed out waiting for {what} to become ready (last error: {last_err})\n"
                    + self.log_tails()
                )
            time.sleep(0.1)

    @staticmethod
    def _http_ok(url: str, *, ctx: ssl.SSLContext | None = None, expect: bytes = b"") -> bool:
        handlers: list = [urllib.request.ProxyHandler({})]
        if ctx is not None:
            handlers.append(urllib.request.HTTPSHandler(context=ctx))
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(url, timeout=2) as resp:
                return resp.status == 200 and expect in resp.read()
        except urllib.error.HTTPError:
            return False  # e.g. 500 while post-start hooks are still running

    def _write_pki(self) -> dict[str, Path]:
        d = self.cert_dir
        ca_key = _new_key()
        ca_name = _name("libvirt-operator-test-ca")
        ca = _issue(subject=ca_name, key=ca_key, issuer=ca_name, issuer_key=ca_key, is_ca=True)

        serving_key = _new_key()
        service_ip = next(ipaddress.ip_network(_SERVICE_CIDR).hosts())
        sans: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
            x509.IPAddress(service_ip),
            *(
                x509.DNSName(n)
                for n in (
                    "localhost",
                    "kubernetes",
                    "kubernetes.default",
                    "kubernetes.default.svc",
                    "kubernetes.default.svc.cluster.local",
                )
            ),
        ]
        serving = _issue(
            subject=_name("kube-apiserver"),
            key=serving_key,
            issuer=ca_name,
            issuer_key=ca_key,
            eku=[ExtendedKeyUsageOID.SERVER_AUTH],
            sans=sans,
        )

        admin_key = _new_key()
        admin = _issue(
            subject=_name("admin", "system:masters"),
            key=admin_key,
            issuer=ca_name,
            issuer_key=ca_key,
            eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
        )

        sa_key = _new_key()
        sa_pub = sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

        # A CA of its own for the front proxy, as kubeadm does: a cert from the cluster CA (a user's)
        # must never pass as the aggregator's.
        fp_ca_key = _new_key()
        fp_ca_name = _name("libvirt-operator-test-front-proxy-ca")
        fp_ca = _issue(subject=fp_ca_name, key=fp_ca_key, issuer=fp_ca_name, issuer_key=fp_ca_key, is_ca=True)
        fp_client_key = _new_key()
        fp_client = _issue(subject=_name(FRONT_PROXY_CLIENT_CN), key=fp_client_key, issuer=fp_ca_name,
                           issuer_key=fp_ca_key, eku=[ExtendedKeyUsageOID.CLIENT_AUTH])

        return {
            "front_proxy_ca_crt": _write(d / "front-proxy-ca.crt", _cert_pem(fp_ca), 0o644),
            "front_proxy_client_crt": _write(d / "front-proxy-client.crt", _cert_pem(fp_client), 0o644),
            "front_proxy_client_key": _write(d / "front-proxy-client.key", _key_pem(fp_client_key)),
            "ca_crt": _write(self.ca_cert_path, _cert_pem(ca), 0o644),
            "ca_key": _write(d / "ca.key", _key_pem(ca_key)),
            "serving_crt": _write(d / "apiserver.crt", _cert_pem(serving), 0o644),
            "serving_key": _write(d / "apiserver.key", _key_pem(serving_key)),
            "admin_crt": _write(self.client_cert_path, _cert_pem(admin), 0o644),
            "admin_key": _write(self.client_key_path, _key_pem(admin_key)),
            "sa_key": _write(d / "sa-signer.key", _key_pem(sa_key)),
            "sa_pub": _write(d / "sa-signer.pub", sa_pub, 0o644),
        }

    def _write_kubeconfig(self, pki: dict[str, Path]) -> None:
        def b64(p: Path) -> str:
            return base64.b64encode(p.read_bytes()).decode()

        # Self-contained (certs embedded). JSON is valid YAML for every kubeconfig loader.
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "envtest",
                    "cluster": {
                        "server": self.server_url,
                        "certificate-authority-data": b64(pki["ca_crt"]),
                    },
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate-data": b64(pki["admin_crt"]),
                        "client-key-data": b64(pki["admin_key"]),
                    },
                }
            ],
            "contexts": [
                {
                    "name": "envtest",
                    "context": {"cluster": "envtest", "user": "admin", "namespace": "default"},
                }
            ],
            "current-context": "envtest",
            "preferences": {},
        }
        tmp = self.kubeconfig_path.with_suffix(".tmp")
        _write(tmp, json.dumps(cfg, indent=2).encode())
        tmp.replace(self.kubeconfig_path)


def _terminate(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)


def start_controlplane(workdir: Path, **kwargs) -> ControlPlane:
    """Start a control plane in ``workdir`` and return it (running).

    The caller owns it and must call ``.stop()`` (or use it as a context manager).
    """
    return ControlPlane(Path(workdir), **kwargs).start()

"""A real single-node Kubernetes cluster for end-to-end tests, inside its own network namespace.

``Cluster(workdir).start()`` creates a network namespace (``ip netns add``) holding every
non-loopback address of the cluster (node IP, ``kubernetes`` Service IP, pod IPs) and runs in it:
etcd, kube-apiserver (Node,RBAC, service-account keys), kube-controller-manager, kube-scheduler,
containerd (own root/state/socket under ``workdir``), a kubelet (cgroupfs), the CNI ``bridge`` +
``host-local`` plugins (own conf dir), dnsmasq (``kubernetes.default.svc``) and a real libvirtd
(:class:`NetnsLibvirtDaemon`) that pods reach at ``qemu+tcp://<node IP>:16509/system``.

The processes enter the namespace with ``nsenter --net`` only (not ``ip netns exec``, which would
also give them a private mount namespace): the kubelet's volume mounts must be seen by containerd
and runc. The test process reaches the cluster from the root namespace through loopback only:
:class:`NetnsForwarder` listens on ``127.0.0.1`` in the root namespace and connects from inside
the cluster's namespace (its thread ``setns``-es into it), so :attr:`Cluster.kubeconfig_path`
points at ``https://127.0.0.1:<port>``.

Binaries: kube-apiserver + etcd from ``hack/ensure-controlplane.sh``, kubelet/kube-scheduler/
kube-controller-manager from ``hack/ensure-cluster-binaries.sh`` (same builder module, same
version); containerd, runc, CNI plugins, dnsmasq from Debian (``hack/install-system-deps.sh``).
Images without a registry: :func:`docker_archive` packs a root filesystem into a docker-archive
tar that :meth:`Cluster.import_image` loads with ``ctr -n k8s.io images import``; the sandbox
image ``localhost/pause:<key>`` is ``hack/cluster/pause.c`` built static.

Teardown (:meth:`Cluster.stop`) kills every container and process it started, removes the pods'
cgroups (``kubepods*``, depth-first), unmounts what the kubelet/containerd mounted under
``workdir``, deletes the pods' and the cluster's network namespaces and restores the global
sysctls the kubelet changes (``vm.overcommit_memory``, ``kernel.panic``, ``kernel.panic_on_oops``)
and removes ``/var/lib/kubelet/device-plugins`` / ``/var/log/containers`` if it created them.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import io
import ipaddress
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.harness.controlplane import (
    REPO_ROOT,
    ControlPlaneUnavailable,
    _cert_pem,
    _child_env,
    _die_with_parent,
    _issue,
    _key_pem,
    _name,
    _new_key,
    _tail,
    _terminate,
    _write,
    ensure_binaries,
)
from tests.harness.libvirt_hosts import NAMESPACE_SCRIPT, LibvirtDaemon, libvirtd_available

__all__ = [
    "Cluster",
    "ClusterError",
    "ClusterUnavailable",
    "NetnsForwarder",
    "NetnsLibvirtDaemon",
    "cluster_prerequisites",
    "docker_archive",
    "ensure_cluster_binaries",
]

ENSURE_SCRIPT = REPO_ROOT / "hack" / "ensure-cluster-binaries.sh"
PAUSE_SOURCE = REPO_ROOT / "hack" / "cluster" / "pause.c"
BIN_DIR_ENV = "LIBVIRT_OPERATOR_CLUSTER_BIN"

NODE_IP = "10.233.0.2"
SERVICE_CIDR = "10.234.0.0/24"
SERVICE_IP = "10.234.0.1"  # the `kubernetes` Service: bound by kube-apiserver itself (no kube-proxy)
POD_CIDR = "10.244.0.0/24"
POD_GATEWAY = "10.244.0.1"
NODE_NAME = "lvo-node"
LIBVIRTD_PORT = 16509

_CLONE_NEWNET = 0x40000000
_GLOBAL_SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")
_HOST_DIRS = (Path("/var/lib/kubelet/device-plugins"), Path("/var/log/containers"))
_TOOLS = ("ip", "nsenter", "containerd", "containerd-shim-runc-v2", "runc", "ctr", "dnsmasq",
          "gcc", "iptables", "mount", "umount")  # fmt: skip


class ClusterError(RuntimeError):
    """The cluster failed to start or to become ready; the message carries log tails."""


class ClusterUnavailable(ClusterError):
    """A prerequisite is missing (tools, root, binaries)."""


def _cache_root() -> Path:
    base = os.environ.get("LIBVIRT_OPERATOR_CACHE") or str(Path.home() / ".cache" / "libvirt-operator")
    return Path(base)


# --------------------------------------------------------------------------------------------
# prerequisites and binaries
# --------------------------------------------------------------------------------------------


def cluster_prerequisites() -> tuple[bool, str]:
    """``(True, "")`` when a :class:`Cluster` can run here, else ``(False, reason)``."""
    if os.geteuid() != 0:
        return False, "the single-node cluster needs root (network namespaces, cgroups, mounts)"
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    if missing:
        return False, f"missing programs: {', '.join(missing)} (run hack/install-system-deps.sh)"
    if not Path("/usr/lib/cni/bridge").exists() or not Path("/usr/lib/cni/host-local").exists():
        return False, "no CNI plugins in /usr/lib/cni (package containernetworking-plugins)"
    ok, why = libvirtd_available()
    if not ok:
        return False, why
    return True, ""


def ensure_cluster_binaries(*, timeout: float | None = 3600) -> Path:
    """Directory holding kubelet, kube-scheduler and kube-controller-manager."""
    env_dir = os.environ.get(BIN_DIR_ENV)
    if env_dir:
        bin_dir = Path(env_dir)
    else:
        if shutil.which("go") is None:
            raise ClusterUnavailable(f"'go' is not in PATH and ${BIN_DIR_ENV} is not set")
        proc = subprocess.run(
            ["bash", str(ENSURE_SCRIPT)], stdout=subprocess.PIPE, text=True, timeout=timeout, check=False
        )
        lines = proc.stdout.strip().splitlines()
        if proc.returncode == 127:
            raise ClusterUnavailable(f"{ENSURE_SCRIPT} could not find its tools (exit 127)")
        if proc.returncode != 0 or not lines:
            raise ClusterError(f"{ENSURE_SCRIPT} failed with exit code {proc.returncode}; see its stderr")
        bin_dir = Path(lines[-1])
    for name in ("kubelet", "kube-scheduler", "kube-controller-manager"):
        if not os.access(bin_dir / name, os.X_OK):
            raise ClusterUnavailable(f"{bin_dir / name} is missing or not executable")
    return bin_dir


# --------------------------------------------------------------------------------------------
# images without a registry
# --------------------------------------------------------------------------------------------


def docker_archive(dest: Path, name: str, files: dict[str, tuple[bytes, int]],
                   *, entrypoint: Sequence[str], user: str = "") -> Path:
    """Write a one-layer docker-archive tar (``docker save`` layout) for image ``name``.

    ``files`` maps absolute paths in the image to ``(content, mode)``; directories are implied.
    """
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        dirs: set[str] = set()
        for path in sorted(files):
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    ti = tarfile.TarInfo(d)
                    ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(ti)
            data, mode = files[path]
            ti = tarfile.TarInfo("/".join(parts))
            ti.size, ti.mode = len(data), mode
            tar.addfile(ti, io.BytesIO(data))
        for d in ("tmp", "dev", "proc", "sys", "etc"):
            if d not in dirs:
                ti = tarfile.TarInfo(d)
                ti.type, ti.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
                tar.addfile(ti)
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": list(entrypoint), "User": user, "Env": ["PATH=/bin:/usr/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "tests/harness/cluster.py docker_archive"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": [name], "Layers": ["layer.tar"]}]
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, mode="w") as tar:
        for member, data in (("layer.tar", layer_bytes), (config_name, config_bytes),
                             ("manifest.json", json.dumps(manifest).encode())):
            ti = tarfile.TarInfo(member)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    os.replace(tmp, dest)
    return dest


def ensure_pause_image() -> tuple[Path, str]:
    """Build (once, cached by the source's hash) the static pause binary's image tar."""
    src = PAUSE_SOURCE.read_bytes()
    key = hashlib.sha256(b"recipe=1\n" + src).hexdigest()[:12]
    name = f"localhost/pause:{key}"
    out = _cache_root() / "cluster-images" / f"pause-{key}.tar"
    if out.is_file():
        return out, name
    out.parent.mkdir(parents=True, exist_ok=True)
    binary = out.with_suffix(f".bin.{os.getpid()}")
    try:
        res = subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(binary), str(PAUSE_SOURCE)],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise ClusterUnavailable(f"gcc -static failed for {PAUSE_SOURCE}: {res.stderr.strip()}")
        docker_archive(out, name, {"/pause": (binary.read_bytes(), 0o755)}, entrypoint=["/pause"])
    finally:
        binary.unlink(missing_ok=True)
    return out, name


def ensure_busybox_image() -> tuple[Path, str]:
    """A tiny image with the static busybox (``busybox-static``), for smoke pods."""
    bb = Path("/bin/busybox")
    data = bb.read_bytes()
    key = hashlib.sha256(b"recipe=1\n" + data).hexdigest()[:12]
    name = f"localhost/busybox:{key}"
    out = _cache_root() / "cluster-images" / f"busybox-{key}.tar"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        files = {"/bin/busybox": (data, 0o755)}
        for applet in ("sh", "sleep", "nslookup", "wget", "nc", "cat", "ls", "echo", "true"):
            files[f"/bin/{applet}"] = (data, 0o755)
        docker_archive(out, name, files, entrypoint=["/bin/sh"])
    return out, name


# --------------------------------------------------------------------------------------------
# network namespace helpers
# --------------------------------------------------------------------------------------------

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _setns(path: str) -> None:
    """Move the calling *thread* into the network namespace at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsForwarder:
    """TCP forwarder: listens on ``127.0.0.1:<port>`` in the root namespace, connects to
    ``target`` from inside the network namespace at ``netns_path``.

    The listening socket is created before the worker thread enters the namespace (a socket
    keeps the namespace it was created in), so the only root-namespace address used is loopback.
    """

    def __init__(self, netns_path: str, target_host: str, target_port: int) -> None:
        self.netns_path = netns_path
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._pipes: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name=f"netns-fwd-{self.port}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        _setns(self.netns_path)  # this thread only; threads it starts inherit the namespace
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        client.settimeout(None)
        with self._lock:
            self._pipes.update((client, upstream))
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, upstream)
        sel.register(upstream, selectors.EVENT_READ, client)
        try:
            open_ends = 2
            while open_ends and not self._stop.is_set():
                for key, _ in sel.select(timeout=0.5):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    dst: socket.socket = key.data
                    try:
                        data = src.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(src)
                        open_ends -= 1
                        with contextlib.suppress(OSError):
                            dst.shutdown(socket.SHUT_WR)
                        continue
                    try:
                        dst.sendall(data)
                    except OSError:
                        open_ends = 0
                        break
        finally:
            sel.close()
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.close()
            with self._lock:
                self._pipes.difference_update((client, upstream))

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for s in list(self._pipes):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=2)


class NetnsLibvirtDaemon(LibvirtDaemon):
    """A :class:`LibvirtDaemon` running in the cluster's network namespace.

    It listens on ``<node IP>:16509`` there (``pod_uri``, for pods); the test process reaches it
    through a loopback :class:`NetnsForwarder` (``uri``)."""

    def __init__(self, *, netns_path: str, node_ip: str, **kwargs: Any) -> None:
        super().__init__(port=LIBVIRTD_PORT, **kwargs)
        self.netns_path = netns_path
        self.node_ip = node_ip
        self.forwarder: NetnsForwarder | None = None

    @property
    def uri(self) -> str:
        if self.forwarder is None:
            return super().uri
        return f"qemu+tcp://127.0.0.1:{self.forwarder.port}/system"

    @property
    def pod_uri(self) -> str:
        return f"qemu+tcp://{self.node_ip}:{LIBVIRTD_PORT}/system"

    def _write_config(self) -> None:
        super()._write_config()
        conf = self._root / "etc" / "libvirtd.conf"
        conf.write_text(conf.read_text().replace('listen_addr = "127.0.0.1"', f'listen_addr = "{self.node_ip}"'))

    def _launch(self) -> None:
        root = self._root
        if self._daemon_log_fh is None:
            self._daemon_log_fh = open(root / "daemon.log", "ab")  # noqa: SIM115
        cmd = ["nsenter", f"--net={self.netns_path}", "--",
               "unshare", "--mount", "--propagation", "private", "--",
               "taskset", "-c", self.cpu, "bash", str(NAMESPACE_SCRIPT),
               str(root)]  # fmt: skip
        self._spawned_at = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._daemon_log_fh,
                                     stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        if self.forwarder is None:
            self.forwarder = NetnsForwarder(self.netns_path, self.node_ip, LIBVIRTD_PORT)

    def wait_ready(self, timeout: float | None = None) -> None:
        import libvirt

        libvirt.registerErrorHandler(lambda *_a: None, None)
        deadline = self._spawned_at + (self.ready_timeout if timeout is None else timeout)
        last = "no attempt"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                break
            try:
                conn = libvirt.open(self.uri)
                try:
                    conn.getCapabilities()
                finally:
                    conn.close()
            except libvirt.libvirtError as exc:
                last = str(exc)
                time.sleep(0.1)
                continue
            self.startup_seconds = time.monotonic() - self._spawned_at
            with contextlib.suppress(OSError):
                self._mnt_ns = os.readlink(f"/proc/{self.proc.pid}/ns/mnt")
            if self.share_qemu_caps:
                self._export_qemu_caps()
            self._setup_pool()
            return
        err = self._failure(f"not ready (last error: {last})")
        self.stop()
        raise err

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self.forwarder is not None:
                self.forwarder.close()
                self.forwarder = None


# --------------------------------------------------------------------------------------------
# the cluster
# --------------------------------------------------------------------------------------------


def _read_sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return None


def _run(cmd: Sequence[str], *, check: bool = True, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check and res.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return res


class Cluster:
    """A single-node cluster in network namespace ``lvo-e2e-<pid>``; see the module docstring."""

    def __init__(self, workdir: Path, *, netns: str | None = None, with_libvirtd: bool = True,
                 startup_timeout: float = 180.0) -> None:
        self.workdir = Path(workdir).resolve()
        self.netns = netns or f"lvo-e2e-{os.getpid()}"
        self.netns_path = f"/run/netns/{self.netns}"
        self.with_libvirtd = with_libvirtd
        self.startup_timeout = startup_timeout
        self.node_ip = NODE_IP
        self.node_name = NODE_NAME
        self.cert_dir = self.workdir / "pki"
        self.kubeconfig_path = self.workdir / "kubeconfig"  # for the test process (loopback)
        self.containerd_socket = self.workdir / "containerd" / "containerd.sock"
        self.libvirtd: NetnsLibvirtDaemon | None = None
        self.apiserver_forwarder: NetnsForwarder | None = None
        self.pause_image = ""
        self.busybox_image = ""
        #: seconds: cold start (everything), and node Ready after the kubelet started
        self.timings: dict[str, float] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[Any] = []
        self._sysctls: dict[str, str] = {}
        self._created_host_dirs: list[Path] = []
        self._netns_before: set[str] = set()
        self._netns_created = False
        self._extra_forwarders: list[NetnsForwarder] = []
        self._sysctls_recorded: dict[str, str] = {}
        self._host_dirs_recorded: list[Path] = []
        self._host_lock: Any = None

    # ---- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Cluster:
        ok, why = cluster_prerequisites()
        if not ok:
            raise ClusterUnavailable(why)
        cp_bin = ensure_binaries()
        k8s_bin = ensure_cluster_binaries()
        self._lock_host()
        t0 = time.monotonic()
        try:
            self._start(cp_bin, k8s_bin)
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - t0
        return self

    def _lock_host(self, timeout: float = 1800) -> None:
        """One cluster per machine at a time: kubelets share the ``kubepods`` cgroups, the global
        sysctls and ``/var/lib/kubelet/device-plugins``. Held until :meth:`stop`."""
        import fcntl

        path = _cache_root() / "cluster.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "w")  # noqa: SIM115 - closed in stop()
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    fh.close()
                    raise ClusterError(f"another test cluster holds {path} for more than {timeout:.0f} s") from None
                time.sleep(1)
        self._host_lock = fh

    def _start(self, cp_bin: Path, k8s_bin: Path) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name in _GLOBAL_SYSCTLS:
            value = _read_sysctl(name)
            if value is not None:
                self._sysctls[name] = value
        for d in (*_HOST_DIRS, Path("/var/lib/kubelet")):
            if not d.exists():
                self._created_host_dirs.append(d)
        self._sysctls_recorded = dict(self._sysctls)
        self._host_dirs_recorded = list(self._created_host_dirs)
        self._netns_before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()

        # ---- network namespace
        if os.path.exists(self.netns_path):
            _run(["ip", "netns", "delete", self.netns], check=False)
        _run(["ip", "netns", "add", self.netns])
        self._netns_created = True
        ns = ["ip", "-n", self.netns]
        _run([*ns, "link", "set", "lo", "up"])
        # A veth pair with both ends in the namespace (the dummy driver is not always available).
        _run([*ns, "link", "add", "lvo0", "type", "veth", "peer", "name", "lvo1"])
        _run([*ns, "link", "set", "lvo1", "up"])
        _run([*ns, "addr", "add", f"{self.node_ip}/24", "dev", "lvo0"])
        _run([*ns, "addr", "add", f"{SERVICE_IP}/32", "dev", "lvo0"])
        _run([*ns, "link", "set", "lvo0", "up"])
        # A default route into the veth pair: nothing ever leaves the namespace.
        _run([*ns, "route", "add", "default", "dev", "lvo0"])

        pki = self._write_pki()
        pause_tar, self.pause_image = ensure_pause_image()

        # ---- etcd + kube-apiserver
        etcd_data = self.workdir / "etcd"
        shutil.rmtree(etcd_data, ignore_errors=True)
        etcd_data.mkdir(mode=0o700)
        self._spawn("etcd", [
            str(cp_bin / "etcd"), "--name=default", f"--data-dir={etcd_data}",
            "--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
            "--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=default=http://127.0.0.1:2380", "--unsafe-no-fsync", "--log-level=warn",
        ])  # fmt: skip
        self._spawn("kube-apiserver", [
            str(cp_bin / "kube-apiserver"), "--etcd-servers=http://127.0.0.1:2379",
            f"--cert-dir={self.cert_dir}", f"--tls-cert-file={pki['apiserver.crt']}",
            f"--tls-private-key-file={pki['apiserver.key']}", f"--client-ca-file={pki['ca.crt']}",
            "--secure-port=443", "--bind-address=0.0.0.0", f"--advertise-address={self.node_ip}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki['sa.pub']}", f"--service-account-signing-key-file={pki['sa.key']}",
            f"--kubelet-client-certificate={pki['apiserver-kubelet.crt']}",
            f"--kubelet-client-key={pki['apiserver-kubelet.key']}",
            "--kubelet-preferred-address-types=InternalIP", "--profiling=false",
        ])  # fmt: skip
        self.apiserver_forwarder = NetnsForwarder(self.netns_path, self.node_ip, 443)
        self._write_kubeconfig(self.kubeconfig_path, f"https://127.0.0.1:{self.apiserver_forwarder.port}",
                               pki["admin.crt"], pki["admin.key"])
        admin_in_ns = self._write_kubeconfig(self.workdir / "admin-netns.kubeconfig",
                                             f"https://{self.node_ip}:443", pki["admin.crt"], pki["admin.key"])
        self._wait("kube-apiserver /readyz", lambda: self._readyz(), 90)

        # ---- controller-manager, scheduler
        self._spawn("kube-controller-manager", [
            str(k8s_bin / "kube-controller-manager"), f"--kubeconfig={admin_in_ns}",
            f"--authentication-kubeconfig={admin_in_ns}", f"--authorization-kubeconfig={admin_in_ns}",
            "--leader-elect=false", f"--service-account-private-key-file={pki['sa.key']}",
            f"--root-ca-file={pki['ca.crt']}", f"--cluster-signing-cert-file={pki['ca.crt']}",
            f"--cluster-signing-key-file={pki['ca.key']}", "--bind-address=127.0.0.1", "--secure-port=10257",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--controllers=*,-nodeipam,-cloud-node-lifecycle",
        ])  # fmt: skip
        self._spawn("kube-scheduler", [
            str(k8s_bin / "kube-scheduler"), f"--kubeconfig={admin_in_ns}",
            f"--authentication-kubeconfig={admin_in_ns}", f"--authorization-kubeconfig={admin_in_ns}",
            "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=10259",
        ])  # fmt: skip

        # ---- dnsmasq (cluster DNS)
        self._spawn("dnsmasq", [
            "dnsmasq", "--keep-in-foreground", "--log-facility=-", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", "--bind-interfaces", f"--listen-address={self.node_ip}", "--except-interface=lo",
            f"--pid-file={self.workdir / 'dnsmasq.pid'}", "--user=root",
            # A host record answers AAAA with NODATA (not REFUSED); --local: NXDOMAIN for other
            # cluster names; anything else is REFUSED (no upstream: nothing leaves the namespace).
            f"--host-record=kubernetes.default.svc.cluster.local,kubernetes.default.svc,{SERVICE_IP}",
            "--local=/cluster.local/", "--local=/svc/", "--domain-needed",
        ])  # fmt: skip

        # ---- containerd + CNI
        self._write_containerd_config()
        self._spawn("containerd", ["containerd", "--config", str(self.workdir / "containerd" / "config.toml")])
        self._wait("containerd", lambda: self.containerd_socket.exists() and self._ctr("version").returncode == 0, 30)
        self.import_image(pause_tar)

        # ---- kubelet
        kubelet_cfg = self._write_kubelet_config(pki)
        kubelet_kc = self._write_kubeconfig(self.workdir / "kubelet.kubeconfig", f"https://{self.node_ip}:443",
                                            pki["kubelet.crt"], pki["kubelet.key"])
        kubelet_started = time.monotonic()
        self._spawn("kubelet", [
            str(k8s_bin / "kubelet"), f"--config={kubelet_cfg}", f"--kubeconfig={kubelet_kc}",
            f"--root-dir={self.workdir / 'kubelet'}", f"--cert-dir={self.workdir / 'kubelet-pki'}",
            f"--node-ip={self.node_ip}", f"--hostname-override={self.node_name}", "--v=1",
            f"--pod-infra-container-image={self.pause_image}",
        ])  # fmt: skip

        # ---- libvirtd, while the node registers
        if self.with_libvirtd:
            self.libvirtd = NetnsLibvirtDaemon(netns_path=self.netns_path, node_ip=self.node_ip, name="node",
                                               root=self.workdir / "libvirtd")
            self.libvirtd.start()

        self._wait("node Ready", self._node_ready, self.startup_timeout)
        self.timings["node_ready_after_kubelet"] = time.monotonic() - kubelet_started

    # ---- teardown ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop everything and restore the host (idempotent, best effort, never raises)."""
        steps: list[Callable[[], None]] = [
            self._stop_libvirtd,
            lambda: self._terminate("kubelet"),
            self._kill_containers,
            lambda: self._terminate("containerd"),
            self._kill_shims,
            self._remove_cgroups,
            self._unmount_workdir,
            lambda: self._terminate("kube-scheduler"),
            lambda: self._terminate("kube-controller-manager"),
            lambda: self._terminate("kube-apiserver", grace=15),
            lambda: self._terminate("etcd"),
            lambda: self._terminate("dnsmasq"),
            self._terminate_rest,
            self._close_forwarder,
            self._delete_netns,
            self._restore_host,
        ]
        for step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - keep tearing down
                with contextlib.suppress(Exception):
                    (self.workdir / "teardown-errors.log").open("a").write(f"{step}: {exc!r}\n")
        for f in self._logs:
            with contextlib.suppress(OSError):
                f.close()
        self._logs.clear()
        if self._host_lock is not None:
            self._host_lock.close()  # releases the flock
            self._host_lock = None

    def _stop_libvirtd(self) -> None:
        if self.libvirtd is not None:
            self.libvirtd.stop()
            self.libvirtd = None

    def _terminate_rest(self) -> None:
        for name in list(self._procs):
            self._terminate(name)

    def _close_forwarder(self) -> None:
        for fwd in self._extra_forwarders:
            fwd.close()
        self._extra_forwarders.clear()
        if self.apiserver_forwarder is not None:
            self.apiserver_forwarder.close()
            self.apiserver_forwarder = None

    def _terminate(self, name: str, grace: float = 10.0) -> None:
        proc = self._procs.pop(name, None)
        if proc is not None:
            _terminate(proc, grace)

    def _kill_containers(self) -> None:
        if "containerd" not in self._procs:
            return
        res = self._ctr("-n", "k8s.io", "tasks", "ls", "-q")
        for cid in res.stdout.split():
            self._ctr("-n", "k8s.io", "tasks", "kill", "-a", "-s", "SIGKILL", cid)
        for cid in res.stdout.split():
            self._ctr("-n", "k8s.io", "tasks", "delete", "-f", cid)
        for cid in self._ctr("-n", "k8s.io", "containers", "ls", "-q").stdout.split():
            self._ctr("-n", "k8s.io", "containers", "delete", cid)

    def _kill_shims(self) -> None:
        marker = str(self.containerd_socket).encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"containerd-shim" in cmdline and marker in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry), signal.SIGKILL)

    def _remove_cgroups(self) -> None:
        root = Path("/sys/fs/cgroup")
        bases: list[Path] = []
        for ctrl in root.iterdir() if root.is_dir() else []:
            if not ctrl.is_dir():
                continue
            bases.extend(p for p in ctrl.glob("kubepods*") if p.is_dir())
            bases.extend(p for p in (root / "kubepods.slice", root / "kubepods") if p.is_dir())
        deadline = time.monotonic() + 15
        for base in dict.fromkeys(bases):
            dirs = sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
            for d in [*dirs, base]:
                while True:
                    # kill what is left in it (processes of killed containers exit quickly)
                    with contextlib.suppress(OSError):
                        for pid in (d / "cgroup.procs").read_text().split():
                            with contextlib.suppress(ProcessLookupError, ValueError):
                                os.kill(int(pid), signal.SIGKILL)
                    try:
                        d.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.05)

    def _unmount_workdir(self) -> None:
        prefix = str(self.workdir) + "/"
        mounts = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].replace("\\040", " ")
                if mp.startswith(prefix):
                    mounts.append(mp)
        for mp in sorted(set(mounts), key=len, reverse=True):
            if subprocess.run(["umount", mp], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", mp], capture_output=True, check=False)

    def _delete_netns(self) -> None:
        if os.path.isdir("/run/netns"):
            for name in set(os.listdir("/run/netns")) - self._netns_before:
                if name.startswith("cni-"):
                    _run(["ip", "netns", "delete", name], check=False)
        if self._netns_created:
            _run(["ip", "netns", "delete", self.netns], check=False)
            self._netns_created = False

    def _restore_host(self) -> None:
        for name, value in self._sysctls.items():
            if _read_sysctl(name) != value:
                with contextlib.suppress(OSError):
                    Path("/proc/sys", name).write_text(value + "\n")
        for d in self._created_host_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._created_host_dirs = []

    def leftovers(self) -> list[str]:
        """What :meth:`stop` failed to undo (empty when the host is as it was)."""
        out = []
        for name, value in self._sysctls_recorded.items():
            if _read_sysctl(name) != value:
                out.append(f"sysctl {name} is {_read_sysctl(name)}, was {value}")
        out += [f"{d} still exists" for d in self._host_dirs_recorded if d.exists()]
        if os.path.exists(self.netns_path):
            out.append(f"network namespace {self.netns} still exists")
        out += [f"cgroup {p}" for p in Path("/sys/fs/cgroup").glob("*/kubepods*")]
        prefix = str(self.workdir) + "/"
        with open("/proc/self/mountinfo") as f:
            out += [f"mount {line.split()[4]}" for line in f if line.split()[4].startswith(prefix)]
        marker = str(self.workdir).encode()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                    if marker in cmd:
                        text = cmd.replace(bytes(1), b" ")[:120].decode(errors="replace")
                        out.append(f"process {entry}: {text}")
        return out

    # ---- client helpers -------------------------------------------------------------------

    def import_image(self, tar: Path) -> None:
        """``ctr -n k8s.io images import`` a docker-archive/OCI tar into the node's containerd."""
        res = self._ctr("-n", "k8s.io", "images", "import", "--no-unpack=false", str(tar), timeout=900)
        if res.returncode != 0:
            res = self._ctr("-n", "k8s.io", "images", "import", str(tar), timeout=900)
        if res.returncode != 0:
            raise ClusterError(f"ctr images import {tar} failed: {res.stderr.strip()}")

    def tag_image(self, source: str, target: str) -> None:
        res = self._ctr("-n", "k8s.io", "images", "tag", "--force", source, target)
        if res.returncode != 0:
            raise ClusterError(f"ctr images tag {source} {target} failed: {res.stderr.strip()}")

    def serve_directory(self, directory: Path, port: int = 8088) -> str:
        """Serve ``directory`` over HTTP on ``<node IP>:port`` inside the namespace (pods can
        download from it); returns the base URL. Stopped with the cluster."""
        name = f"http-{port}"
        self._spawn(name, [sys.executable, "-m", "http.server", str(port), "--bind", self.node_ip,
                           "--directory", str(directory)])
        fwd = NetnsForwarder(self.netns_path, self.node_ip, port)
        self._extra_forwarders.append(fwd)

        def up() -> bool:
            with socket.create_connection(("127.0.0.1", fwd.port), timeout=2) as s:
                s.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
                return s.recv(12).startswith(b"HTTP/")

        self._wait(f"http server on {self.node_ip}:{port}", up, 20)
        return f"http://{self.node_ip}:{port}"

    def images(self) -> list[str]:
        return self._ctr("-n", "k8s.io", "images", "ls", "-q").stdout.split()

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(
            f"--- {name}.log\n{_tail(self.workdir / f'{name}.log', lines)}" for name in
            ("kube-apiserver", "kubelet", "containerd", "kube-controller-manager", "kube-scheduler")
        )

    def _ctr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ctr", "--address", str(self.containerd_socket), *args],
                              capture_output=True, text=True, timeout=timeout, check=False)

    # ---- internals --------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        env = _child_env()
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        self._procs[name] = subprocess.Popen(
            ["nsenter", f"--net={self.netns_path}", "--", *args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, env=env,
            start_new_session=True, preexec_fn=_die_with_parent,  # noqa: PLW1509
        )

    def _wait(self, what: str, probe: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited ({proc.returncode}) waiting for {what}\n{self.log_tails()}")
            try:
                if probe():
                    return
            except Exception as exc:  # noqa: BLE001 - keep polling
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what} ({last})\n{self.log_tails()}")
            time.sleep(0.2)

    def _api(self, path: str) -> Any:
        import ssl
        import urllib.request

        assert self.apiserver_forwarder is not None
        ctx = ssl.create_default_context(cafile=str(self.cert_dir / "ca.crt"))
        ctx.load_cert_chain(str(self.cert_dir / "admin.crt"), str(self.cert_dir / "admin.key"))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=ctx))
        with opener.open(f"https://127.0.0.1:{self.apiserver_forwarder.port}{path}", timeout=5) as resp:
            return resp.read()

    def _readyz(self) -> bool:
        return self._api("/readyz") == b"ok"

    def _node_ready(self) -> bool:
        node = json.loads(self._api(f"/api/v1/nodes/{self.node_name}"))
        return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))

    def _write_pki(self) -> dict[str, Path]:
        d = self.cert_dir
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(mode=0o700, parents=True)
        ca_key = _new_key()
        ca_name = _name("lvo-e2e-ca")
        ca = _issue(subject=ca_name, key=ca_key, issuer=ca_name, issuer_key=ca_key, is_ca=True)
        out = {"ca.crt": _write(d / "ca.crt", _cert_pem(ca), 0o644), "ca.key": _write(d / "ca.key", _key_pem(ca_key))}

        def leaf(stem: str, cn: str, org: str | None, eku: list, sans: Iterable[x509.GeneralName] = ()) -> None:
            key = _new_key()
            cert = _issue(subject=_name(cn, org), key=key, issuer=ca_name, issuer_key=ca_key, eku=eku, sans=list(sans))
            out[f"{stem}.crt"] = _write(d / f"{stem}.crt", _cert_pem(cert), 0o644)
            out[f"{stem}.key"] = _write(d / f"{stem}.key", _key_pem(key))

        ips = [self.node_ip, SERVICE_IP, "127.0.0.1"]
        dns = ["kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local",
               "localhost"]
        leaf("apiserver", "kube-apiserver", None, [ExtendedKeyUsageOID.SERVER_AUTH],
             [x509.IPAddress(ipaddress.ip_address(i)) for i in ips] + [x509.DNSName(n) for n in dns])
        leaf("admin", "admin", "system:masters", [ExtendedKeyUsageOID.CLIENT_AUTH])
        leaf("apiserver-kubelet", "kube-apiserver-kubelet-client", "system:masters", [ExtendedKeyUsageOID.CLIENT_AUTH])
        leaf("kubelet", f"system:node:{self.node_name}", "system:nodes", [ExtendedKeyUsageOID.CLIENT_AUTH])
        sa_key = _new_key()
        out["sa.key"] = _write(d / "sa.key", _key_pem(sa_key))
        out["sa.pub"] = _write(d / "sa.pub", sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
        return out

    def _write_kubeconfig(self, path: Path, server: str, crt: Path, key: Path) -> Path:
        def b64(p: Path) -> str:
            return base64.b64encode(p.read_bytes()).decode()

        cfg = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "lvo-e2e", "cluster": {"server": server,
                                                         "certificate-authority-data": b64(self.cert_dir / "ca.crt")}}],
            "users": [{"name": "user", "user": {"client-certificate-data": b64(crt), "client-key-data": b64(key)}}],
            "contexts": [{"name": "lvo-e2e", "context": {"cluster": "lvo-e2e", "user": "user", "namespace": "default"}}],
            "current-context": "lvo-e2e",
        }  # fmt: skip
        return _write(path, json.dumps(cfg, indent=2).encode())

    def _write_containerd_config(self) -> None:
        base = self.workdir / "containerd"
        cni_conf = self.workdir / "cni" / "net.d"
        for d in (base / "root", base / "state", base / "opt", cni_conf):
            d.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-lvo-bridge.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "lvo-pods",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR, "gateway": POD_GATEWAY}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.workdir / "cni" / "ipam")}},
                {"type": "loopback"},
            ],
        }, indent=2))  # fmt: skip
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (base / "config.toml").write_text(f"""version = 2
root = "{base / 'root'}"
state = "{base / 'state'}"
[grpc]
  address = "{self.containerd_socket}"
[ttrpc]
  address = "{self.containerd_socket}.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.internal.v1.opt"]
  path = "{base / 'opt'}"
[{cri}]
  sandbox_image = "{self.pause_image}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  enable_selinux = false
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni_conf}"
""")

    def _write_kubelet_config(self, pki: dict[str, Path]) -> Path:
        cfg = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs", "failSwapOn": False, "failCgroupV1": False,
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(pki["ca.crt"])}},
            "authorization": {"mode": "Webhook"},
            "readOnlyPort": 0, "port": 10250, "address": self.node_ip, "healthzBindAddress": "127.0.0.1",
            "podLogsDir": str(self.workdir / "pod-logs"),
            "clusterDNS": [self.node_ip], "clusterDomain": "cluster.local", "resolvConf": "",
            "staticPodPath": "", "serializeImagePulls": False,
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "protectKernelDefaults": False, "makeIPTablesUtilChains": False,
            "nodeStatusReportFrequency": "10s", "nodeStatusUpdateFrequency": "5s",
            "syncFrequency": "10s", "fileCheckFrequency": "10s",
            "localStorageCapacityIsolation": True, "maxPods": 110,
        }  # fmt: skip
        path = self.workdir / "kubelet-config.json"
        _write(path, json.dumps(cfg, indent=2).encode(), 0o644)
        return path


def run_forever(workdir: Path) -> None:  # pragma: no cover - a dev helper
    """``python -m tests.harness.cluster WORKDIR``: start, print the kubeconfig, wait for ^C."""
    with Cluster(workdir) as c:
        print(c.kubeconfig_path, json.dumps(c.timings), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.sigwait({signal.SIGINT, signal.SIGTERM})


if __name__ == "__main__":  # pragma: no cover
    run_forever(Path(sys.argv[1]))

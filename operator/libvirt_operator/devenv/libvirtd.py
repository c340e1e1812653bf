"""Real local libvirt hosts, for the embedded default and the tests (file hosts for the test
driver: :mod:`.testhost`).

:class:`LibvirtDaemon`: ``libvirtd`` + its own ``virtlogd`` with QEMU (TCG),
each in a private mount namespace with its state under its own directory, listening on
``qemu+tcp://127.0.0.1:PORT/system``. Needs root, ``unshare``, ``taskset`` and the Debian
packages installed by ``hack/install-system-deps.sh``. On these machines such a daemon
advertises both ``qemu`` and ``kvm`` in ``getCapabilities()`` and answers
``getDomainCapabilities(virttype='kvm')`` (``/dev/kvm`` exists), yet a KVM guest dies at
start (no vmx/svm): capabilities alone do not prove KVM works; use ``type='qemu'`` here.
A daemon is ready ~8 s after launch the first time (QEMU capability probe), ~0.2-0.3 s
once the probe result is cached (shared under ``$LIBVIRT_OPERATOR_CACHE``, see below).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "LibvirtDaemon",
    "LibvirtDaemonError",
    "libvirtd_available",
    "start_all",
    "start_daemons",
]

NAMESPACE_SCRIPT = Path(__file__).resolve().parent / "data" / "libvirtd-in-namespace.sh"

# Directories of a real daemon, relative to its root, and what they hide inside its namespace.
BIND_DIRS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}


def _quiet_libvirt() -> Any:
    import libvirt

    libvirt.registerErrorHandler(lambda *_a: None, None)
    return libvirt


# --------------------------------------------------------------------------------------------
# Real daemons
# --------------------------------------------------------------------------------------------

def _dir_pool_xml(name: str, path: Path) -> str:
    pool = ET.Element("pool", type="dir")
    ET.SubElement(pool, "name").text = name
    ET.SubElement(ET.SubElement(pool, "target"), "path").text = str(path)
    return ET.tostring(pool, encoding="unicode")


class LibvirtDaemonError(RuntimeError):
    """A daemon failed to start or to become ready; the message carries its log tails."""


_REQUIRED_TOOLS = ("libvirtd", "virtlogd", "unshare", "taskset", "mount", "qemu-system-x86_64")
_available_cache: tuple[bool, str] | None = None
_available_lock = threading.Lock()


def libvirtd_available() -> tuple[bool, str]:
    """Whether :class:`LibvirtDaemon` can run here: ``(True, "")`` or ``(False, reason)``."""
    global _available_cache
    with _available_lock:
        if _available_cache is None:
            _available_cache = _check_available()
        return _available_cache


def _check_available() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "real libvirtd hosts need root (mount namespaces, QEMU as root)"
    try:
        _quiet_libvirt()
    except ImportError as exc:
        return False, f"libvirt-python is not installed ({exc})"
    missing = [t for t in _REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        return False, (
            f"missing programs: {', '.join(missing)} (run hack/install-system-deps.sh)"
        )
    try:
        import grp
        import pwd

        pwd.getpwnam("libvirt-qemu")
        grp.getgrnam("libvirt-qemu")
    except KeyError:
        return False, "no libvirt-qemu user/group (run hack/install-system-deps.sh)"
    try:
        res = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "true"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"unshare --mount failed: {exc}"
    if res.returncode != 0:
        return False, f"unshare --mount failed: {res.stderr.strip()}"
    return True, ""


_ports_lock = threading.Lock()
_ports_given: set[int] = set()


def _free_port() -> int:
    with _ports_lock:
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _ports_given:
                _ports_given.add(port)
                return port
    raise LibvirtDaemonError("no free TCP port found")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no {path.name})"
    return "\n".join(text.splitlines()[-lines:]) or f"({path.name} is empty)"


def _pid_from_file(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on ``port`` (IPv4/IPv6, this network namespace)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def _owns_listening_port(pid: int, port: int) -> bool | None:
    """True if ``pid`` listens on ``port``, False if another process does, None if nobody."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            return True
    return False


def _pids_in_mount_ns(ns: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/mnt") == ns:
                    pids.append(int(entry))
            except OSError:
                continue
    return [p for p in pids if _alive(p)]


def _kill_and_wait(pid: int, timeout: float, first: int = signal.SIGTERM) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, first)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


class LibvirtDaemon:
    """One real ``libvirtd`` (+ ``virtlogd``) on loopback TCP, in its own mount namespace.

    Use as a context manager (or :meth:`start` / :meth:`stop`)::

        with LibvirtDaemon(name="host-a") as d:
            conn = libvirt.open(d.uri)   # qemu+tcp://127.0.0.1:PORT/system

    Layout under :attr:`root`: ``etc/ run/ lib/ cache/ log/`` (bind-mounted over the
    ``/etc/libvirt`` … ``/var/log/libvirt`` of the daemon's namespace), ``pool/`` (the dir
    pool ``default``, defined, started and autostarted), ``host-uuid`` (:attr:`host_uuid`:
    each daemon is a distinct host, so domains can migrate between them) and ``daemon.log``
    (stdout/stderr of the namespace script and libvirtd). libvirtd logs to ``log/libvirtd.log``, virtlogd to
    ``log/virtlogd.log``, QEMU to ``log/qemu/<domain>.log``. The root and the pool are at
    the same path inside and outside the namespace, so files placed there (ISOs, serial
    logs) are visible to both.
    """

    def __init__(
        self,
        *,
        name: str = "libvirtd",
        root: str | os.PathLike[str] | None = None,
        port: int | None = None,
        ready_timeout: float = 30.0,
        keep: bool | None = None,
        cpu: str = "0",
        log_level: int = 3,
        share_qemu_caps: bool = True,
    ) -> None:
        self.name = name
        self._root_given = root is not None
        self.root = Path(root).resolve() if root else None  # created in start()
        self.port = port
        self.ready_timeout = ready_timeout
        self.keep = (
            keep if keep is not None else os.environ.get("LIBVIRT_OPERATOR_KEEP_HOSTS") == "1"
        )
        self.cpu = cpu
        self.log_level = log_level
        self.share_qemu_caps = share_qemu_caps
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self._daemon_log_fh: Any = None
        self._mnt_ns: str | None = None
        self._spawned_at = 0.0

    # ---- public properties -------------------------------------------------------------

    @property
    def uri(self) -> str:
        if self.port is None:
            raise LibvirtDaemonError("daemon not started")
        return f"qemu+tcp://127.0.0.1:{self.port}/system"

    @property
    def pool_path(self) -> Path:
        return self._root / "pool"

    @property
    def run_dir(self) -> Path:
        return self._root / "run"

    @property
    def log_dir(self) -> Path:
        return self._root / "log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def virtlogd_pid(self) -> int | None:
        return _pid_from_file(self.run_dir / "virtlogd.pid")

    @property
    def _root(self) -> Path:
        if self.root is None:
            raise LibvirtDaemonError("daemon not started")
        return self.root

    def connect(self) -> Any:
        """A new ``libvirt.virConnect`` to this daemon (caller closes it)."""
        return _quiet_libvirt().open(self.uri)

    # ---- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> LibvirtDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LibvirtDaemon:
        """Spawn and wait until ready (pool ``default`` included)."""
        self.spawn()
        self.wait_ready()
        return self

    def spawn(self) -> None:
        """Write the config and launch the namespace script; does not wait."""
        ok, reason = libvirtd_available()
        if not ok:
            raise LibvirtDaemonError(f"libvirtd cannot run here: {reason}")
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix=f"libvirtd-{self.name}-"))
        for forbidden in BIND_DIRS.values():
            if self.root == Path(forbidden) or Path(forbidden) in self.root.parents:
                raise LibvirtDaemonError(f"root {self.root} must not be under {forbidden}")
        if self.port is None:
            self.port = _free_port()
        self._write_config()
        if self.share_qemu_caps:
            self._import_qemu_caps()
        self._launch()

    # libvirtd probes QEMU (~8 s here) when its capabilities cache is empty or stale. The cache
    # is valid for any daemon on the same machine with the same QEMU, libvirtd and CPU pinning
    # (libvirt checks binary ctimes, kernel, microcode and CPUID itself and re-probes when it
    # disagrees), so it is shared through the user cache: a seeded daemon is ready in ~0.2 s.
    def _shared_caps_dir(self) -> Path:
        base = os.environ.get("LIBVIRT_OPERATOR_CACHE") or str(
            Path.home() / ".cache" / "libvirt-operator"
        )
        return Path(base) / "libvirtd-qemu-caps" / f"cpu{self.cpu.replace(',', '_')}"

    def qemu_caps_cached(self) -> bool:
        """Whether the shared QEMU capabilities cache has entries (a start will be fast)."""
        return any(self._shared_caps_dir().glob("*.xml"))

    def _import_qemu_caps(self) -> None:
        src = self._shared_caps_dir()
        dst = self._root / "cache" / "qemu" / "capabilities"
        if not src.is_dir():
            return
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.glob("*.xml"):
            if not (dst / f.name).exists():
                with contextlib.suppress(OSError):
                    shutil.copyfile(f, dst / f.name)
                    os.chmod(dst / f.name, 0o600)

    def _export_qemu_caps(self) -> None:
        src = self._root / "cache" / "qemu" / "capabilities"
        dst = self._shared_caps_dir()
        try:
            files = {f.name: f.read_bytes() for f in src.glob("*.xml")}
            if not files:
                return
            dst.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                target = dst / name
                if target.is_file() and target.read_bytes() == data:
                    continue
                tmp = dst / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
                tmp.write_bytes(data)
                os.replace(tmp, target)
            for old in dst.glob("*.xml"):
                if old.name not in files:
                    old.unlink(missing_ok=True)
        except OSError:
            pass

    @property
    def host_uuid(self) -> str:
        """This host's UUID (``host_uuid`` in its libvirtd.conf), kept in ``<root>/host-uuid``.

        Daemons on one machine would otherwise all report the machine's SMBIOS/machine-id UUID,
        and libvirt refuses to migrate between them ("Attempt to migrate guest to the same
        host"). Made once per root, so a restarted daemon keeps its identity.
        """
        path = self._root / "host-uuid"
        try:
            return str(uuid.UUID(path.read_text().strip()))
        except (OSError, ValueError):
            pass
        value = str(uuid.uuid4())
        tmp = path.with_name(f".host-uuid.{os.getpid()}.tmp")
        tmp.write_text(value + "\n")
        os.replace(tmp, path)
        return value

    def _write_config(self) -> None:
        root = self._root
        for sub in (*BIND_DIRS, "pool", "log/qemu"):  # log/qemu: as the Debian package creates it
            (root / sub).mkdir(parents=True, exist_ok=True)
        etc = root / "etc"
        (etc / "libvirtd.conf").write_text(
            f"""# generated by libvirt_operator/devenv/libvirtd.py for {self.name}
listen_tls = 0
listen_tcp = 1
listen_addr = "127.0.0.1"
tcp_port = "{self.port}"
auth_tcp = "none"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "{self.log_level}:file:/var/log/libvirt/libvirtd.log"
host_uuid = "{self.host_uuid}"
"""
        )
        (etc / "virtlogd.conf").write_text(
            'log_outputs = "3:file:/var/log/libvirt/virtlogd.log"\n'
        )
        (etc / "qemu.conf").write_text(
            """# generated by libvirt_operator/devenv/libvirtd.py
user = "root"
group = "root"
# cgroups are not namespaced: two hosts with a domain of the same name and id would share one.
cgroup_controllers = [ ]
"""
        )

    def _launch(self) -> None:
        root = self._root
        if self._daemon_log_fh is None:
            self._daemon_log_fh = open(root / "daemon.log", "ab")  # noqa: SIM115
        self._daemon_log_fh.write(f"--- start on port {self.port} ---\n".encode())
        self._daemon_log_fh.flush()
        cmd = [
            "unshare", "--mount", "--propagation", "private", "--",
            "taskset", "-c", self.cpu,
            "bash", str(NAMESPACE_SCRIPT), str(root),
        ]  # fmt: skip
        self._spawned_at = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._daemon_log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )

    def _failure(self, what: str) -> LibvirtDaemonError:
        root = self._root
        return LibvirtDaemonError(
            f"libvirtd {self.name!r} (root {root}, port {self.port}): {what}\n"
            f"--- daemon.log ---\n{_tail(root / 'daemon.log')}\n"
            f"--- log/libvirtd.log ---\n{_tail(root / 'log' / 'libvirtd.log')}\n"
            f"--- log/virtlogd.log ---\n{_tail(root / 'log' / 'virtlogd.log', 10)}"
        )

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll ``getCapabilities()`` until it answers, then set up the pool ``default``.

        Retries once on a new port when the first one was taken meanwhile. Raises
        :class:`LibvirtDaemonError` with the log tails on failure (and stops the daemon).
        """
        libvirt = _quiet_libvirt()
        timeout = self.ready_timeout if timeout is None else timeout
        attempts = 0
        while True:
            deadline = self._spawned_at + timeout
            last_err = "no attempt"
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    break
                # Only talk to the port once our libvirtd listens on it: a client connecting
                # to someone else's listener could block forever.
                if not _owns_listening_port(self.proc.pid, self.port or 0):
                    last_err = f"libvirtd not (yet) listening on port {self.port}"
                    time.sleep(0.05)
                    continue
                try:
                    conn = libvirt.open(self.uri)
                    try:
                        conn.getCapabilities()
                    finally:
                        conn.close()
                except libvirt.libvirtError as exc:
                    last_err = str(exc)
                    time.sleep(0.05)
                    continue
                self.startup_seconds = time.monotonic() - self._spawned_at
                with contextlib.suppress(OSError):
                    self._mnt_ns = os.readlink(f"/proc/{self.proc.pid}/ns/mnt")
                if self.share_qemu_caps:
                    self._export_qemu_caps()
                try:
                    self._setup_pool()
                except libvirt.libvirtError as exc:
                    err = self._failure(f"setting up pool 'default' failed: {exc}")
                    self.stop()
                    raise err from exc
                return
            exited = self.proc is not None and self.proc.poll() is not None
            log = _tail(self._root / "daemon.log", 200) + _tail(
                self._root / "log" / "libvirtd.log", 200
            )
            if exited and "Address already in use" in log and attempts < 2:
                attempts += 1
                self._kill_processes()
                self.port = _free_port()
                self._write_config()
                self._launch()
                continue
            what = (
                f"exited with code {self.proc.returncode}"
                if exited and self.proc is not None
                else f"not ready after {timeout:.0f}s (last error: {last_err})"
            )
            err = self._failure(what)
            self.stop()
            raise err

    def _setup_pool(self) -> None:
        libvirt = _quiet_libvirt()
        conn = libvirt.open(self.uri)
        try:
            try:
                pool = conn.storagePoolLookupByName("default")
            except libvirt.libvirtError:
                pool = conn.storagePoolDefineXML(_dir_pool_xml("default", self.pool_path), 0)
            if not pool.isActive():
                pool.create(0)
            pool.setAutostart(1)
        finally:
            conn.close()

    def stop(self) -> None:
        """Destroy and undefine all domains, stop QEMU, libvirtd, virtlogd; remove the root."""
        if self.proc is None and self.root is None:
            return
        try:
            if self.proc is not None and self.proc.poll() is None:
                self._destroy_domains()
            self._kill_processes()
        finally:
            if self._daemon_log_fh is not None:
                self._daemon_log_fh.close()
                self._daemon_log_fh = None
            self.proc = None
            if self.root is not None and not self.keep:
                shutil.rmtree(self.root, ignore_errors=True)
                if not self._root_given:
                    self.root = None

    def power_off(self) -> None:
        """Pull the plug: SIGKILL libvirtd, virtlogd and every QEMU of this host at once. Its state (domain
        definitions, pools, volumes) stays under the root, so :meth:`start` boots the same host again on the
        same port, with its guests shut off as after a power cut."""
        pids = set(self._qemu_pids())
        if self._mnt_ns and self._mnt_ns != os.readlink("/proc/self/ns/mnt"):
            pids.update(_pids_in_mount_ns(self._mnt_ns))
        if self.proc is not None:
            pids.add(self.proc.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)
            self.proc = None
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._mnt_ns = None

    def _destroy_domains(self) -> None:
        libvirt = _quiet_libvirt()
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError:
            return
        flags = (
            libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
            | getattr(libvirt, "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 0)
        )
        try:
            for dom in conn.listAllDomains():
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isPersistent():
                        try:
                            dom.undefineFlags(flags)
                        except libvirt.libvirtError:
                            dom.undefine()
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def _qemu_pids(self) -> list[int]:
        pids = []
        for pidfile in (self.run_dir / "qemu").glob("*.pid"):
            pid = _pid_from_file(pidfile)
            if pid and _alive(pid) and "qemu" in _cmdline(pid):
                pids.append(pid)
        return pids

    def _kill_processes(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.root is None:
            return
        for pid in self._qemu_pids():
            _kill_and_wait(pid, 5)
        vpid = self.virtlogd_pid
        if vpid and _alive(vpid) and "virtlogd" in _cmdline(vpid):
            _kill_and_wait(vpid, 5)
        # Last sweep: whatever still lives in the host's private mount namespace (the script's
        # watchdog exits within 0.5 s of libvirtd) is ours; once it is empty, the namespace and
        # its bind mounts are gone.
        if self._mnt_ns and self._mnt_ns != os.readlink("/proc/self/ns/mnt"):
            deadline = time.monotonic() + 3
            while _pids_in_mount_ns(self._mnt_ns) and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid in _pids_in_mount_ns(self._mnt_ns):
                _kill_and_wait(pid, 2, signal.SIGKILL)
            self._mnt_ns = None
        for stale in ("virtlogd.pid", "libvirtd.pid"):
            with contextlib.suppress(OSError):
                (self.run_dir / stale).unlink()

    def __repr__(self) -> str:
        return f"LibvirtDaemon(name={self.name!r}, uri={self.port and self.uri!r}, root={self.root})"


def start_all(daemons: Sequence[LibvirtDaemon]) -> None:
    """Start several daemons concurrently: spawn all, then wait for each.

    With a cold QEMU capabilities cache the first daemon is started alone (its ~8 s probe
    fills the shared cache; probes running side by side on the pinned CPU only queue up),
    then the rest start from the cache. On failure the daemons already started are stopped.
    """
    try:
        rest = list(daemons)
        if rest and rest[0].share_qemu_caps and not rest[0].qemu_caps_cached():
            rest.pop(0).start()
        for d in rest:
            d.spawn()
        for d in rest:
            d.wait_ready()
    except BaseException:
        for d in daemons:
            with contextlib.suppress(Exception):
                d.stop()
        raise


def start_daemons(
    count: int, *, names: Sequence[str] | None = None, **kwargs: Any
) -> list[LibvirtDaemon]:
    """Create and start ``count`` daemons concurrently (see :func:`start_all`)."""
    names = list(names) if names else [f"host{i}" for i in range(count)]
    daemons = [LibvirtDaemon(name=n, **kwargs) for n in names[:count]]
    start_all(daemons)
    return daemons

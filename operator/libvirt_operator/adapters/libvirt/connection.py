"""Pooled libvirt connections, one per host, with bounded per-host concurrency.

libvirt calls are blocking C calls: every call runs in the host's own small thread pool, so a slow
or hung host can neither block kopf's event loop nor starve the other hosts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import libvirt

from ...core import hosturi
from ...core.errors import AppError, ErrorCode
from ...core.logs import get_logger
from ...core.metrics import HOST_CONNECTED, LIBVIRT_CALL_SECONDS, LIBVIRT_CALLS
from .errors import CONNECTION_LOST, classify_libvirt_error

T = TypeVar("T")
log = get_logger(__name__)
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, not printed


@dataclasses.dataclass(frozen=True)
class ConnectOptions:
    """What is needed to open a connection. `credentials` holds Secret data (never logged)."""

    uri: str
    max_concurrent_calls: int = 4
    credentials: Mapping[str, bytes] = dataclasses.field(default_factory=dict, repr=False)
    call_timeout: float = 60.0


class _CredentialFiles:
    """Materialises Secret data as the files libvirt's transports read (0600, private 0700 dir).

    Only the operator sets the parameters that name files or programs (users may not: core/hosturi.py).
    qemu+ssh:// runs the `ssh` binary, which knows no `known_hosts=` parameter: libvirt runs the
    wrapper written here instead (`command=`), which execs ssh with a generated config (strict host
    key checking against the Secret's known_hosts only, batch mode, this key only, no agent, no
    proxies) and its log in the same directory, read back to explain a failure.
    """

    SSH_KEYS = {"ssh-privatekey": "id_key", "known_hosts": "known_hosts"}
    TLS_KEYS = {"ca.crt": "cacert.pem", "tls.crt": "clientcert.pem", "tls.key": "clientkey.pem"}

    def __init__(self, credentials: Mapping[str, bytes]) -> None:
        self.dir = tempfile.mkdtemp(prefix="lvop-cred-")
        os.chmod(self.dir, 0o700)
        self.ssh_log = os.path.join(self.dir, "ssh.log")
        for key, value in credentials.items():
            fname = self.SSH_KEYS.get(key) or self.TLS_KEYS.get(key)
            if fname:
                self._write(fname, value, 0o600)

    def _write(self, fname: str, data: bytes, mode: int) -> str:
        path = os.path.join(self.dir, fname)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return path

    def path(self, fname: str) -> str:
        return os.path.join(self.dir, fname)

    def uri_for(self, parsed: hosturi.HostUri) -> str:
        extra: list[tuple[str, str]] = []
        if parsed.transport == "ssh":
            extra = [("command", self._ssh_wrapper()), ("no_tty", "1")]
        elif parsed.ssh:  # libssh, libssh2: libvirt reads the files itself and verifies the host key
            extra = [("keyfile", self.path("id_key")), ("known_hosts", self.path("known_hosts")),
                     ("known_hosts_verify", "normal"), ("sshauth", "privkey")]
        elif parsed.tls and os.path.exists(self.path("cacert.pem")):
            extra = [("pkipath", self.dir)]
        return parsed.render(extra)

    def _ssh_wrapper(self) -> str:
        ssh = shutil.which("ssh") or "/usr/bin/ssh"
        config = "\n".join([
            "Host *",
            f'  UserKnownHostsFile "{self.path("known_hosts")}"',
            "  GlobalKnownHostsFile /dev/null",
            "  StrictHostKeyChecking yes",
            "  CheckHostIP no",
            "  UpdateHostKeys no",
            f'  IdentityFile "{self.path("id_key")}"',
            "  IdentitiesOnly yes",
            "  IdentityAgent none",
            "  BatchMode yes",
            "  PreferredAuthentications publickey",
            "  PasswordAuthentication no",
            "  KbdInteractiveAuthentication no",
            "  ConnectTimeout 10",
            "  ServerAliveInterval 10",
            "  ServerAliveCountMax 3",
            "  ProxyCommand none",
            "  ProxyJump none",
            "  ControlMaster no",
            "  ControlPath none",
            "  ForwardAgent no",
            "  ForwardX11 no",
            "  ClearAllForwardings yes",
            "  PermitLocalCommand no",
            "  LogLevel ERROR",
            "",
        ])
        cfg = self._write("ssh_config", config.encode(), 0o600)
        script = (f"#!/bin/sh\n# written by libvirt-operator: ssh with the Secret's known_hosts, strict checking\n"
                  f"exec {shlex.quote(ssh)} -F {shlex.quote(cfg)} -E {shlex.quote(self.ssh_log)} \"$@\"\n")
        return self._write("ssh", script.encode(), 0o700)

    def ssh_failure(self) -> str | None:
        """What ssh logged (its own messages only, never file contents), if anything."""
        try:
            with open(self.ssh_log, errors="replace") as fh:
                return fh.read(8192)
        except OSError:
            return None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class HostConnection:
    """A lazily opened, self-healing connection to one libvirt host."""

    def __init__(self, name: str, options: ConnectOptions) -> None:
        self.name = name
        self.options = options
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=options.max_concurrent_calls, thread_name_prefix=f"libvirt-{name}")
        self._lock = threading.Lock()
        self._conn: libvirt.virConnect | None = None
        self._alive = False
        self._creds: _CredentialFiles | None = None
        self._closed = False
        self.on_connect: list[Callable[[libvirt.virConnect], None]] = []

    # -- blocking side (runs in the host's threads) --
    def _open(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is not None and self._alive:
                return self._conn
            self._drop_locked()
            parsed = _checked_uri(self.options)
            uri = parsed.render()
            if self.options.credentials:
                self._creds = _CredentialFiles(self.options.credentials)
                uri = self._creds.uri_for(parsed)
            started = time.perf_counter()
            try:
                conn = libvirt.openAuth(uri, [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE],
                                              _no_interactive_auth, None], 0)
            except libvirt.libvirtError as err:
                LIBVIRT_CALLS.labels(self.name, "connect", "error").inc()
                if parsed.driver == "test":  # its parse errors quote the file: never pass them on
                    raise AppError(ErrorCode.HOST_UNREACHABLE,
                                   f"libvirt's test driver could not load {parsed.test_file or 'its default host'}"
                                   " (not a readable test-driver host file; details withheld as they may "
                                   "quote the file)", {"host": self.name, "operation": "connect"}) from None
                ssh_log = None
                if parsed.transport == "ssh":
                    ssh_log = self._creds.ssh_failure() if self._creds else None
                elif parsed.ssh:
                    ssh_log = str(err)
                raise _connect_error(err, self.name, parsed, ssh_log) from err
            finally:
                LIBVIRT_CALL_SECONDS.labels(self.name, "connect").observe(time.perf_counter() - started)
            LIBVIRT_CALLS.labels(self.name, "connect", "ok").inc()
            with contextlib.suppress(libvirt.libvirtError):
                conn.setKeepAlive(5, 3)  # only effective with an event loop implementation
            with contextlib.suppress(libvirt.libvirtError):
                conn.registerCloseCallback(self._on_close, None)
            self._conn, self._alive = conn, True
            HOST_CONNECTED.labels(self.name).set(1)
            for hook in self.on_connect:
                hook(conn)
            return conn

    def _on_close(self, _conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        log.warning("libvirt connection closed", host=self.name, reason=reason)
        self._alive = False
        HOST_CONNECTED.labels(self.name).set(0)

    def _drop_locked(self) -> None:
        if self._conn is not None:
            # Event callbacks hold references to the connection: left registered, close() only drops
            # ours and the transport (socket, ssh child) stays open for the life of the process.
            for callback_id in list(getattr(self._conn, "domainEventCallbackID", None) or ()):
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.domainEventDeregisterAny(callback_id)
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.unregisterCloseCallback()
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
        self._conn, self._alive = None, False
        if self._creds is not None:
            self._creds.remove()
            self._creds = None
        HOST_CONNECTED.labels(self.name).set(0)

    def _run(self, operation: str, fn: Callable[[libvirt.virConnect], T]) -> T:
        for attempt in (1, 2):
            conn = self._open()
            if not self._is_alive(conn):
                self._mark_dead()
                conn = self._open()
            started = time.perf_counter()
            try:
                result = fn(conn)
            except libvirt.libvirtError as err:
                LIBVIRT_CALLS.labels(self.name, operation, "error").inc()
                lost = err.get_error_code() in CONNECTION_LOST and not self._is_alive(conn)
                if lost and attempt == 1:
                    log.info("libvirt connection lost, reopening", host=self.name, operation=operation)
                    self._mark_dead()
                    continue
                raise classify_libvirt_error(err, host=self.name, operation=operation) from err
            finally:
                LIBVIRT_CALL_SECONDS.labels(self.name, operation).observe(time.perf_counter() - started)
            LIBVIRT_CALLS.labels(self.name, operation, "ok").inc()
            return result
        raise AssertionError("unreachable")

    @staticmethod
    def _is_alive(conn: libvirt.virConnect) -> bool:
        try:
            return bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    def _mark_dead(self) -> None:
        with self._lock:
            self._drop_locked()

    # -- async side --
    async def call(self, operation: str, fn: Callable[[libvirt.virConnect], T],
                   timeout: float | None = None) -> T:
        """Run fn(conn) in this host's thread pool; the event loop never blocks on libvirt."""
        if self._closed:
            raise AppError(ErrorCode.HOST_NOT_FOUND, f"host {self.name} was removed", {"host": self.name})
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._run, operation, fn)
        try:
            return await asyncio.wait_for(future, timeout or self.options.call_timeout)
        except (asyncio.TimeoutError, TimeoutError) as err:
            LIBVIRT_CALLS.labels(self.name, operation, "timeout").inc()
            raise AppError(ErrorCode.LIBVIRT_TIMEOUT,
                           f"libvirt call {operation} on host {self.name} did not finish within "
                           f"{timeout or self.options.call_timeout:.0f}s",
                           {"host": self.name, "operation": operation}) from err

    async def close(self) -> None:
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._executor, self._mark_dead)
        self._executor.shutdown(wait=False, cancel_futures=True)


def _no_interactive_auth(credentials: list, _opaque: object) -> int:
    return -1  # the operator never prompts: credentials come from Secrets


def _checked_uri(options: ConnectOptions) -> hosturi.HostUri:
    """The URI's grammar again (reconcile checked it with the settings) and the Secret keys it needs."""
    try:
        parsed = hosturi.parse(options.uri)
    except hosturi.HostUriError as err:
        raise AppError(ErrorCode.INVALID_SPEC, f"invalid LibvirtHost spec: uri refused: {err}", {"field": "spec.uri"}) from None
    needed = hosturi.secret_keys(parsed)
    if parsed.ssh and needed is not None:
        missing = hosturi.missing_keys_message("credentialsSecretRef", needed, list(options.credentials))
        if missing:
            raise AppError(ErrorCode.CREDENTIALS_NOT_FOUND, missing, {})
    return parsed


# ssh's own log (qemu+ssh) or libvirt's libssh/libssh2 transport errors (qemu+libssh, qemu+libssh2)
_SSH_KEY_CHANGED = re.compile(r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key for \S+ has changed"
                              r"|SSH HOST KEY VERIFICATION FAILED|differs from stored identity")
_SSH_KEY_UNKNOWN = re.compile(r"No \S+ host key is known for|no suitable callback for host key verification")
_SSH_KEY_REFUSED = re.compile(r"Permission denied \(([^)]*)\)")


def _ssh_error(parsed: hosturi.HostUri, ssh_log: str, host: str) -> AppError | None:
    context = {"host": host, "operation": "connect"}
    where = parsed.endpoint
    if _SSH_KEY_CHANGED.search(ssh_log):
        return AppError(ErrorCode.HOST_AUTH_FAILED,
                        f"host key mismatch for {where}: the key it presented is not the one in the Secret's "
                        "known_hosts (ssh host key verification failed)", context)
    if _SSH_KEY_UNKNOWN.search(ssh_log):
        return AppError(ErrorCode.HOST_AUTH_FAILED,
                        f"host key mismatch for {where}: the Secret's known_hosts has no key for it (entries for "
                        "a port other than 22 are written [host]:port; ssh host key verification failed)", context)
    if "Host key verification failed" in ssh_log:
        return AppError(ErrorCode.HOST_AUTH_FAILED,
                        f"host key mismatch for {where} (ssh host key verification failed)", context)
    refused = _SSH_KEY_REFUSED.search(ssh_log)
    if refused:
        return AppError(ErrorCode.HOST_AUTH_FAILED,
                        f"{where} refused the ssh key in the Secret's ssh-privatekey for user "
                        f"{parsed.user or '(default)'}: Permission denied ({refused.group(1)})", context)
    return None


def _connect_error(err: libvirt.libvirtError, host: str, parsed: hosturi.HostUri | None = None,
                   ssh_log: str | None = None) -> AppError:
    if parsed is not None and ssh_log:
        ssh = _ssh_error(parsed, ssh_log, host)
        if ssh is not None:
            ssh.cause = err
            return ssh
    app = classify_libvirt_error(err, host=host, operation="connect")
    if app.code in (ErrorCode.LIBVIRT_ERROR, ErrorCode.VM_NOT_FOUND, ErrorCode.LIBVIRT_TIMEOUT):
        return AppError(ErrorCode.HOST_UNREACHABLE, app.message, app.context, cause=err)
    return app


class HostPool:
    """host name → HostConnection; a connection is replaced when its options change."""

    def __init__(self) -> None:
        self._hosts: dict[str, HostConnection] = {}

    def get(self, name: str) -> HostConnection | None:
        return self._hosts.get(name)

    def names(self) -> list[str]:
        return list(self._hosts)

    async def ensure(self, name: str, options: ConnectOptions) -> HostConnection:
        current = self._hosts.get(name)
        if current is not None and current.options == options:
            return current
        if current is not None:
            await current.close()
        conn = HostConnection(name, options)
        self._hosts[name] = conn
        return conn

    async def remove(self, name: str) -> None:
        conn = self._hosts.pop(name, None)
        if conn is not None:
            await conn.close()

    async def close_all(self) -> None:
        for name in list(self._hosts):
            await self.remove(name)

"""Host credentials as the files libvirt's transports read, and their cleanup.

Each connection gets a private directory named after the process that made it (pid and start time).
A process killed without cleanup (SIGKILL, OOM kill) leaves its directories behind, in the pod's /tmp,
which outlives a container restart: the next operator removes them (`remove_stale`) and stops an ssh
one of them still runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import tempfile
from collections.abc import Mapping

from ...core import hosturi

PREFIX = "lvop-cred-"


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): with the pid, it names one process ever."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2:].split()[19].decode()  # field 22; the name may hold spaces


def _owner() -> str:
    """This process, as its directories are named (asked each time: a forked child is another process)."""
    return f"{os.getpid()}-{_start_time(os.getpid())}"


_DIR_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-(\d+)-[^/]+")


def _kill_ssh_of(directory: str) -> None:
    """Stop the ssh process started with this directory's wrapper, if it still runs (checked by its
    command line, which names the directory: a reused pid is left alone)."""
    try:
        with open(os.path.join(directory, "ssh.pid")) as fh:
            pid = int(fh.read().strip() or 0)
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            mine = directory.encode() in fh.read()
    except (OSError, ValueError):
        return
    if pid > 0 and mine:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def remove_stale(root: str | None = None) -> list[str]:
    """Remove the credential directories of processes that no longer run (a pid now used by another
    process counts as gone: its start time differs), after stopping any ssh still running from one.
    Directories of live processes, this one included, and names of any other form are left alone."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        match = _DIR_NAME.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        if _start_time(int(match[1])) == match[2]:
            continue  # its process still runs
        _kill_ssh_of(entry.path)
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return sorted(removed)


class CredentialFiles:
    """Materialises Secret data as the files libvirt's transports read (0600, private 0700 dir).

    Only the operator sets the parameters that name files or programs (users may not: core/hosturi.py).
    qemu+ssh:// runs the `ssh` binary, which knows no `known_hosts=` parameter: libvirt runs the
    wrapper written here instead (`command=`), which execs ssh with a generated config (strict host
    key checking against the Secret's known_hosts only, batch mode, this key only, no agent, no
    proxies) and its log in the same directory, read back to explain a failure.
    """

    SSH_KEYS = {"ssh-privatekey": "id_key", "known_hosts": "known_hosts"}
    TLS_KEYS = {"ca.crt": "cacert.pem", "tls.crt": "clientcert.pem", "tls.key": "clientkey.pem"}

    def __init__(self, credentials: Mapping[str, bytes], connect_timeout: float = 20.0) -> None:
        self.dir = tempfile.mkdtemp(prefix=f"{PREFIX}{_owner()}-")
        os.chmod(self.dir, 0o700)
        self.ssh_log = os.path.join(self.dir, "ssh.log")
        self.ssh_pid = os.path.join(self.dir, "ssh.pid")
        self.ssh_connect_timeout = max(1, int(connect_timeout / 2))
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
            f"  ConnectTimeout {self.ssh_connect_timeout}",
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
        # The pid file lets the operator stop this ssh (exec keeps the pid) when a connect hangs or
        # the host is removed; libvirt itself would wait for it.
        script = (f"#!/bin/sh\n# written by libvirt-operator: ssh with the Secret's known_hosts, strict checking\n"
                  f"echo $$ > {shlex.quote(self.ssh_pid)}\n"
                  f"exec {shlex.quote(ssh)} -F {shlex.quote(cfg)} -E {shlex.quote(self.ssh_log)} \"$@\"\n")
        return self._write("ssh", script.encode(), 0o700)

    def ssh_failure(self) -> str | None:
        """What ssh logged (its own messages only, never file contents), if anything."""
        try:
            with open(self.ssh_log, errors="replace") as fh:
                return fh.read(8192)
        except OSError:
            return None

    def kill_ssh(self) -> None:
        """Stop the ssh process started for this connection, if it still runs."""
        _kill_ssh_of(self.dir)

    def forget_private_keys(self) -> None:
        """Once the connection is open its key has done its work (ssh, libssh and TLS read it while
        connecting only): it leaves the disk then, not when the connection closes, which a SIGKILLed
        operator never does. The directory stays for the ssh pid file and log."""
        for fname in ("id_key", "clientkey.pem"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(fname))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

"""The real operator as a separate process (`python -m libvirt_operator run`), so a test can kill -9
it at any moment, as a node failure or an OOM kill would, and start a fresh one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


class OperatorProcess:
    """One operator process at a time, restarted as often as a test likes; each run's output goes to
    its own log file (shown in assertion messages via `tail`)."""

    def __init__(self, kubeconfig: Path, log_dir: Path, namespaces: tuple[str, ...] = (), *,
                 extra_args: tuple[str, ...] = (), name: str = "operator") -> None:
        self.kubeconfig = kubeconfig
        self.log_dir = log_dir
        self.namespaces = namespaces
        self.extra_args = extra_args  # e.g. the leader-election flags (tests/integration/test_leader_election.py)
        self.name = name  # log file prefix: several processes may share log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}-{self.runs}.log"

    def start(self) -> OperatorProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.runs += 1
        args = [sys.executable, "-m", "libvirt_operator", "run", "--metrics-port", "0", "--liveness-port", "0",
                "--no-knowledge-base", "--allow-test-driver", "--log-format", "json", "--log-level", "DEBUG"]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        args += list(self.extra_args)
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup handler, no last patch, no finalizer removed."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

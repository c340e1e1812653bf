"""Credential directories left by an operator process that was killed without cleanup (SIGKILL, OOM
kill) are removed by the next one; those of live processes never are. In a pod, /tmp is an emptyDir
that outlives a container restart, and a directory may still hold a private key when the kill came
during a connect."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from libvirt_operator.adapters.libvirt import credentials
from libvirt_operator.adapters.libvirt.credentials import CredentialFiles, remove_stale


def _dir(root: Path, pid: int, start: str | None, suffix: str = "x1") -> Path:
    d = root / f"{credentials.PREFIX}{pid}-{start}-{suffix}"
    d.mkdir()
    (d / "id_key").write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    return d


def test_directories_of_gone_processes_go_and_those_of_live_ones_stay(tmp_path: Path) -> None:
    ended = subprocess.Popen(["true"])
    ended.wait()
    with subprocess.Popen(["sleep", "60"]) as alive:
        try:
            gone = _dir(tmp_path, ended.pid, "12345")
            reused = _dir(tmp_path, os.getpid(), "1", "x2")  # our pid, another process's start time
            ours = _dir(tmp_path, os.getpid(), credentials._start_time(os.getpid()), "x3")
            other = _dir(tmp_path, alive.pid, credentials._start_time(alive.pid), "x4")
            unrelated = tmp_path / f"{credentials.PREFIX}abc"
            unrelated.mkdir()
            assert remove_stale(str(tmp_path)) == sorted([str(gone), str(reused)])
            assert not gone.exists() and not reused.exists()
            assert ours.exists() and other.exists() and unrelated.exists()
        finally:
            alive.kill()


def test_an_ssh_still_running_from_a_stale_directory_is_stopped(tmp_path: Path) -> None:
    ended = subprocess.Popen(["true"])
    ended.wait()
    stale = _dir(tmp_path, ended.pid, "12345")
    reused_pid = _dir(tmp_path, ended.pid, "12345", "x2")  # its ssh.pid now names an unrelated process
    # stands in for the ssh a killed operator's connect left hanging: its command line names the directory
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", str(stale / "ssh_config")])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (stale / "ssh.pid").write_text(f"{hung.pid}\n")
        (reused_pid / "ssh.pid").write_text(f"{bystander.pid}\n")
        assert remove_stale(str(tmp_path)) == sorted([str(stale), str(reused_pid)])
        assert hung.wait(timeout=10) == -9
        assert bystander.poll() is None
    finally:
        hung.kill()
        bystander.kill()


def test_the_directories_this_process_makes_are_recognised_and_kept_while_it_runs() -> None:
    files = CredentialFiles({"ssh-privatekey": b"key", "known_hosts": b"hosts"})
    try:
        name = os.path.basename(files.dir)
        assert credentials._DIR_NAME.fullmatch(name), name
        assert (os.stat(files.dir).st_mode & 0o777) == 0o700
        assert files.dir not in remove_stale(os.path.dirname(files.dir))
        assert os.path.exists(files.path("id_key"))
    finally:
        files.remove()

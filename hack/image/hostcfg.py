#!/usr/bin/env python3
"""Host facts and cache keys for hack/image/build.sh (stdlib only, runs on the host's python3).

Read at run time, never written into the repository:

* ``apt-mirrors``: the Debian and Debian-security mirrors from /etc/apt/sources.list*
  (one-line and deb822 formats), printed as ``<debian-uri> <security-uri>``.
* ``pip-args``: the host pip's index settings (environment first, then ``pip config list``),
  one ``--build-arg=NAME=VALUE`` per line, for PIP_INDEX_URL / PIP_EXTRA_INDEX_URL /
  PIP_TRUSTED_HOST only.
* ``tree-hash PATH...``: a content hash of files and directory trees (paths relative to the
  current directory, __pycache__/*.pyc/*.egg-info skipped, like .dockerignore).
"""

from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys
from pathlib import Path

PIP_KEYS = ("index-url", "extra-index-url", "trusted-host")


def _sources() -> list[tuple[list[str], list[str]]]:
    """[(uris, suites)] from every enabled apt source entry."""
    files = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list")),
             *sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))]
    out: list[tuple[list[str], list[str]]] = []
    for name in files:
        try:
            text = Path(name).read_text()
        except OSError:
            continue
        if name.endswith(".sources"):
            for stanza in text.split("\n\n"):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
                if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
                    continue
                out.append((fields.get("uris", "").split(), fields.get("suites", "").split()))
        else:
            for line in text.splitlines():
                parts = line.split("#", 1)[0].split()
                if len(parts) < 3 or parts[0] != "deb":
                    continue
                rest = parts[1:]
                if rest[0].startswith("["):  # an option block: [arch=amd64 signed-by=...]
                    end = next((i for i, p in enumerate(rest) if p.endswith("]")), len(rest) - 1)
                    rest = rest[end + 1:]
                if len(rest) >= 2:
                    out.append(([rest[0]], [rest[1]]))
    return out


def apt_mirrors() -> tuple[str, str]:
    debian = security = ""
    for uris, suites in _sources():
        for uri in uris:
            if not debian and "bookworm" in suites:
                debian = uri
            if not security and "bookworm-security" in suites:
                security = uri
    if not debian:
        raise SystemExit("hostcfg: no Debian bookworm mirror in /etc/apt/sources.list*")
    if not security:
        security = debian.rstrip("/") + "-security"
    return debian, security


def pip_args() -> list[str]:
    values: dict[str, str] = {}
    try:
        listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                                text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        listed = ""
    for line in listed.splitlines():
        if "=" not in line:
            continue
        k, v = line.split("=", 1)
        key = k.rsplit(".", 1)[-1]
        if key in PIP_KEYS:
            values[key] = v.strip().strip("'\"")
    for key in PIP_KEYS:  # the environment wins, as for pip itself
        env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if env:
            values[key] = env
    return [f"--build-arg=PIP_{k.upper().replace('-', '_')}={v}" for k, v in sorted(values.items())]


def tree_hash(paths: list[str]) -> str:
    h = hashlib.sha256()
    for top in paths:
        p = Path(top)
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            if any(part == "__pycache__" or part.endswith(".egg-info") for part in f.parts) or f.suffix == ".pyc":
                continue
            h.update(str(f).encode() + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "apt-mirrors":
        print(*apt_mirrors())
    elif cmd == "pip-args":
        for a in pip_args():
            print(a)
    elif cmd == "tree-hash":
        print(tree_hash(args))
    else:
        print(f"hostcfg: unknown command {cmd}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The test suite's control plane is the product's dev-time one (libvirt_operator.devenv.controlplane):
one implementation for `make run` and the tests. Re-exported here for the fixtures and the harness
modules that build on it (cluster.py reuses its PKI and process helpers)."""

from __future__ import annotations

from pathlib import Path

from libvirt_operator.devenv.controlplane import (  # noqa: F401 - re-exports
    BIN_DIR_ENV,
    ControlPlane,
    ControlPlaneError,
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
    start_controlplane,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

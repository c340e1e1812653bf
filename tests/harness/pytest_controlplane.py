"""pytest plugin: a session-wide envtest-style control plane.

Enable with ``pytest_plugins = ["tests.harness.pytest_controlplane"]`` in the
top-level ``tests/conftest.py``.

Fixtures:
  controlplane -- the running :class:`tests.harness.controlplane.ControlPlane`
  kubeconfig   -- :class:`pathlib.Path` of its admin kubeconfig

If the binaries can't be had (no ``go`` in PATH and no
``$LIBVIRT_OPERATOR_CONTROLPLANE_BIN``) the tests are skipped, except under
``CI=true`` where that is a failure.  The first run builds kube-apiserver and
etcd (minutes; cached afterwards): run ``hack/ensure-controlplane.sh`` beforehand
to see the build output.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.controlplane import ControlPlane, ControlPlaneUnavailable, ensure_binaries


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="session")
def controlplane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    try:
        bin_dir = ensure_binaries()
    except ControlPlaneUnavailable as exc:
        if _in_ci():
            pytest.fail(f"control plane unavailable in CI: {exc}", pytrace=False)
        pytest.skip(f"control plane unavailable: {exc}")
    workdir = tmp_path_factory.mktemp("controlplane")
    with ControlPlane(workdir, bin_dir=bin_dir) as cp:
        yield cp


@pytest.fixture(scope="session")
def kubeconfig(controlplane: ControlPlane) -> Path:
    return controlplane.kubeconfig_path

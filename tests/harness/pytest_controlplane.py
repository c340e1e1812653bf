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


def _started_controlplane(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[ControlPlane]:
    try:
        bin_dir = ensure_binaries()
    except ControlPlaneUnavailable as exc:
        if _in_ci():
            pytest.fail(f"control plane unavailable in CI: {exc}", pytrace=False)
        pytest.skip(f"control plane unavailable: {exc}")
    with ControlPlane(tmp_path_factory.mktemp(name), bin_dir=bin_dir) as cp:
        yield cp


@pytest.fixture(scope="session")
def controlplane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    yield from _started_controlplane(tmp_path_factory, "controlplane")


@pytest.fixture(scope="module")
def private_cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A control plane of the module's own (with the CRDs), for tests that stop it or count its requests."""
    from .kube import Kube

    for cp in _started_controlplane(tmp_path_factory, "private-cp"):
        Kube(cp.kubeconfig_path).apply_crds()
        yield cp


@pytest.fixture(scope="session")
def kubeconfig(controlplane: ControlPlane) -> Path:
    return controlplane.kubeconfig_path

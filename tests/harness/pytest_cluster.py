"""pytest plugin: a real single-node Kubernetes cluster for the end-to-end tests (tests/e2e).

Fixtures (session-scoped):
  e2e_cluster    -- :class:`tests.harness.cluster.Cluster` started by the harness, or ``None``
                    when ``$KUBECONFIG`` names a user's cluster (``make e2e-cluster``)
  e2e_kubeconfig -- :class:`pathlib.Path` of the kubeconfig the e2e tests use
  helm_bin       -- path of the pinned helm binary (hack/ensure-helm.sh)
  operator_image -- the operator image name, present on the node (hack/image/build.sh + import)

With ``$LIBVIRT_OPERATOR_E2E_KUBECONFIG`` (what ``make e2e-cluster KUBECONFIG=...`` sets) the
tests use that cluster instead of starting one. A missing prerequisite skips the tests with the
reason, except under ``CI=true`` where it is a failure (like the other harness fixtures).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.cluster import Cluster, ClusterUnavailable
from tests.harness.controlplane import REPO_ROOT, ControlPlaneUnavailable

USER_KUBECONFIG_ENV = "LIBVIRT_OPERATOR_E2E_KUBECONFIG"
IMAGE_ENV = "LIBVIRT_OPERATOR_E2E_IMAGE"
IMAGE_ARCHIVE_ENV = "LIBVIRT_OPERATOR_E2E_IMAGE_ARCHIVE"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"e2e cluster unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"e2e cluster unavailable: {reason}")


@pytest.fixture(scope="session")
def e2e_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster | None]:
    if os.environ.get(USER_KUBECONFIG_ENV):
        yield None
        return
    workdir = tmp_path_factory.mktemp("cluster")
    cluster = Cluster(workdir)
    try:
        cluster.start()
    except (ClusterUnavailable, ControlPlaneUnavailable) as exc:
        _unavailable(str(exc))
    try:
        yield cluster
    finally:
        cluster.stop()
    left = cluster.leftovers()
    if left:
        pytest.fail("the cluster's teardown left the host changed:\n" + "\n".join(left), pytrace=False)


@pytest.fixture(scope="session")
def e2e_kubeconfig(e2e_cluster: Cluster | None) -> Path:
    if e2e_cluster is None:
        return Path(os.environ[USER_KUBECONFIG_ENV])
    return e2e_cluster.kubeconfig_path


@pytest.fixture(scope="session")
def helm_bin() -> str:
    if shutil.which("go") is None:
        _unavailable("'go' is not in PATH: cannot build helm (hack/ensure-helm.sh)")
    proc = subprocess.run(["bash", str(REPO_ROOT / "hack" / "ensure-helm.sh")], stdout=subprocess.PIPE,
                          text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(f"hack/ensure-helm.sh failed ({proc.returncode})", pytrace=False)
    return lines[-1]


@pytest.fixture(scope="session")
def operator_image(e2e_cluster: Cluster | None) -> str:
    """The operator image, present on the node: ``$LIBVIRT_OPERATOR_E2E_IMAGE`` when set (a user's
    cluster must be able to pull it), else built by ``hack/image/build.sh`` (cached) and imported
    into the harness node's containerd."""
    name = os.environ.get(IMAGE_ENV)
    archive = os.environ.get(IMAGE_ARCHIVE_ENV)
    if name and archive and e2e_cluster is not None:  # a prebuilt docker-archive tar of that image
        e2e_cluster.import_image(Path(archive))
        return name
    if name:
        return name
    if e2e_cluster is None:
        _unavailable(f"set ${IMAGE_ENV} to an operator image your cluster can pull")
    script = REPO_ROOT / "hack" / "image" / "build.sh"
    if not script.is_file():
        _unavailable(f"{script} does not exist")
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or len(lines[-1].split()) != 2:
        pytest.fail(f"{script} failed ({proc.returncode}); see its stderr", pytrace=False)
    tar, name = lines[-1].split()
    assert e2e_cluster is not None
    e2e_cluster.import_image(Path(tar))
    e2e_cluster.timings["image_build_and_import"] = time.monotonic() - t0
    return name

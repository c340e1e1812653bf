"""pytest fixtures: a test Kubernetes client with our CRDs applied, and the in-process operator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .kube import Kube
from .operator import InProcessOperator


@pytest.fixture(scope="session")
def kube(kubeconfig) -> Kube:
    client = Kube(kubeconfig)
    client.apply_crds()
    return client


@pytest.fixture(scope="session")
def operator(kube, kubeconfig) -> Iterator[InProcessOperator]:
    """One operator for the session (cluster-wide); tests isolate themselves by namespace and host names."""
    op = InProcessOperator(kubeconfig)
    op.start()
    yield op
    op.stop()


@pytest.fixture
def namespace(kube) -> Iterator[str]:
    name = kube.new_namespace()
    yield name
    # No namespace controller runs in the test control plane: the namespace stays Terminating; that is fine.
    kube.core.delete_namespace(name)

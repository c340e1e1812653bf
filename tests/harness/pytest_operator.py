"""pytest fixtures: a test Kubernetes client with our CRDs applied, and the in-process operator."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from libvirt_operator.core.settings import Settings

from .kube import Kube
from .operator import InProcessOperator


@pytest.fixture(scope="session")
def kube(kubeconfig) -> Kube:
    client = Kube(kubeconfig)
    client.apply_crds()
    return client


@pytest.fixture(scope="session")
def operator(kube, kubeconfig, rag_index, tmp_path_factory) -> Iterator[InProcessOperator]:
    """One operator for the session (cluster-wide), with its knowledge base, as in production;
    tests isolate themselves by namespace and host names. test:// host files: under the session's
    temporary directory (where test_host_factory writes them)."""
    settings = Settings(knowledge_base_enabled=True, rag_db_dir=str(rag_index["db_dir"]),
                        download_allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),),
                        allow_test_driver=True, test_driver_dirs=(str(tmp_path_factory.getbasetemp()),))
    op = InProcessOperator(kubeconfig, settings=settings)
    op.start()
    yield op
    op.stop()


@pytest.fixture
def namespace(kube) -> Iterator[str]:
    name = kube.new_namespace()
    yield name
    # No namespace controller runs in the test control plane: the namespace stays Terminating; that is fine.
    kube.core.delete_namespace(name)

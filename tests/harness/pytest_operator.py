"""pytest fixtures: a test Kubernetes client with our CRDs applied, and the in-process operator."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
                        allow_test_driver=True, test_driver_dirs=(str(tmp_path_factory.getbasetemp()),),
                        console_port=0, console_service_names=(CONSOLE_SERVICE_DNS,))
    op = InProcessOperator(kubeconfig, settings=settings)
    op.start()
    _SESSION_OPERATORS.append(op)
    yield op
    _SESSION_OPERATORS.remove(op)
    op.stop()


_SESSION_OPERATORS: list[InProcessOperator] = []
# The console API's Service as tests register it (tests/integration/test_console.py): an ExternalName
# Service to localhost; its name is in the self-signed cert, so the APIService can carry its caBundle.
CONSOLE_SERVICE_NAMESPACE, CONSOLE_SERVICE = "default", "libvirt-operator-console"
CONSOLE_SERVICE_DNS = f"{CONSOLE_SERVICE}.{CONSOLE_SERVICE_NAMESPACE}.svc"


@pytest.fixture(scope="module")
def without_session_operator() -> Iterator[None]:
    """For a module whose tests run operators of their own (e.g. processes they kill -9): the session
    operator, when an earlier test started it, is stopped for the module (it watches every namespace
    and would act on the module's objects too) and started again afterwards."""
    paused = [op for op in _SESSION_OPERATORS if op._thread is not None]
    for op in paused:
        op.stop()
    yield
    for op in paused:
        op.start()


@pytest.fixture(scope="module")
def libvirtd_host(kube, libvirtd, operator) -> Iterator[str]:
    """A LibvirtHost on the session's real libvirtd, Ready, for one module's tests; deleted afterwards."""
    (libvirtd.root / "log" / "qemu").mkdir(parents=True, exist_ok=True)  # the serial logs live there
    name = f"hv-{uuid.uuid4().hex[:6]}"
    kube.create("libvirthosts", {"metadata": {"name": name},
                                 "spec": {"uri": libvirtd.uri, "insecure": True, "probeIntervalSeconds": 5}})
    kube.wait_condition("libvirthosts", name, "Ready", "True", timeout=60)
    yield name
    kube.delete("libvirthosts", name)


@contextlib.contextmanager
def loopback_downloads(operator: InProcessOperator, cache: Path, **settings: Any) -> Iterator[Path]:
    """While inside: the session operator downloads ISOImages into `cache` and may reach loopback
    (the test HTTP server); `settings` override more fields. The settings are restored afterwards."""
    rt = operator.runtime
    original = rt.settings
    rt.settings = dataclasses.replace(original, iso_cache_dir=str(cache),
                                      download_allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),), **settings)
    try:
        yield cache
    finally:
        rt.settings = original


@pytest.fixture
def iso_downloads(operator, tmp_path) -> Iterator[Path]:
    with loopback_downloads(operator, tmp_path / "iso-cache", iso_resync_seconds=2.0) as cache:
        yield cache


@pytest.fixture
def namespace(kube) -> Iterator[str]:
    name = kube.new_namespace()
    yield name
    # No namespace controller runs in the test control plane: the namespace stays Terminating; that is fine.
    kube.core.delete_namespace(name)

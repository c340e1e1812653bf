"""The operator's API client looks up the environment's proxy for the API server once, when it is built,
not in a worker thread on every request (kubernetes_asyncio's session trusted the environment)."""

from __future__ import annotations

import pytest
from kubernetes_asyncio import client

from libvirt_operator.adapters.kube.client import _api_client


def _cfg(host: str) -> client.Configuration:
    cfg = client.Configuration()
    cfg.host = host
    return cfg


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy",
                 "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


async def test_the_environment_proxy_applies_to_the_api_server_and_is_looked_up_once(monkeypatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy-user:s3cret@127.0.0.2:3128")
    api = _api_client(_cfg("https://kube.example.test:6443"))
    try:
        assert api.rest_client.proxy == "http://127.0.0.2:3128"
        assert api.rest_client.proxy_headers["Proxy-Authorization"].startswith("Basic ")
        assert api.rest_client.pool_manager.trust_env is False  # no per-request netrc/proxy lookups
    finally:
        await api.close()


async def test_no_proxy_and_no_environment_mean_a_direct_connection(monkeypatch) -> None:
    api = _api_client(_cfg("https://kube.example.test:6443"))
    assert api.rest_client.proxy is None
    await api.close()
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.2:3128")
    monkeypatch.setenv("NO_PROXY", "kube.example.test")
    api = _api_client(_cfg("https://kube.example.test:6443"))
    assert api.rest_client.proxy is None
    await api.close()


async def test_a_kubeconfig_proxy_wins_over_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.2:3128")
    cfg = _cfg("https://kube.example.test:6443")
    cfg.proxy = "http://127.0.0.3:8080"
    api = _api_client(cfg)
    assert api.rest_client.proxy == "http://127.0.0.3:8080"
    await api.close()

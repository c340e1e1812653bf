"""pytest plugin: the operator's /metrics on a loopback port and a real Prometheus.

Fixtures:
  metrics_server     -- function scope; the operator's own metrics server (cli.metrics_server) on
                        127.0.0.1:<free port>, serving this process's registry, i.e. the in-process
                        session operator's metrics; ``.port``; stopped at the end of the test
  prometheus_factory -- function scope; ``make(targets={job: [addr]}, rule_files=[...], interval="1s")`` starts a
                        :class:`tests.harness.prometheus.Prometheus`; all stop at the end of the test

Without the `prometheus` binary the tests skip, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.prometheus import Prometheus, prometheus_binary


def require_prometheus() -> None:
    if prometheus_binary() is None:
        if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
            pytest.fail("prometheus unavailable in CI (hack/install-system-deps.sh installs it)", pytrace=False)
        pytest.skip("prometheus not installed (hack/install-system-deps.sh)")


class _Served:
    def __init__(self, server: Any) -> None:
        self.server = server
        self.port = int(server.server_address[1])
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def metrics_server() -> Iterator[_Served]:
    from libvirt_operator.cli.metrics_server import serve_metrics

    served = _Served(serve_metrics(0, "127.0.0.1"))
    yield served
    served.stop()


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Any]:
    require_prometheus()
    started: list[Prometheus] = []

    def make(targets: dict[str, list[str]], rule_files: list[Path] = (),  # type: ignore[assignment]
             interval: str = "1s") -> Prometheus:
        workdir = tmp_path / f"prometheus-{len(started)}"
        workdir.mkdir()
        prom = Prometheus(workdir, targets, list(rule_files), interval=interval)
        started.append(prom)
        return prom.start()

    yield make
    for prom in started:
        prom.stop()

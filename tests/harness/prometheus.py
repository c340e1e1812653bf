"""A real Prometheus (Debian's `prometheus` package, installed by hack/install-system-deps.sh) on
127.0.0.1, scraping given loopback targets every second and evaluating given rule files every second.
Its own process and TSDB directory; never the system service."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from tests.harness.libvirt_hosts import _kill_and_wait

REPO = Path(__file__).resolve().parents[2]


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def promtool_binary() -> str | None:
    return shutil.which("promtool")


def monitoring_generator() -> ModuleType:
    """hack/monitoring/generate.py (the dashboard and alert rules' single source)."""
    spec = importlib.util.spec_from_file_location("lvop_monitoring_generate", REPO / "hack" / "monitoring" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, workdir: Path, targets: dict[str, list[str]], rule_files: list[Path] = (),  # type: ignore[assignment]
                 interval: str = "1s") -> None:
        for addrs in targets.values():
            for addr in addrs:
                assert addr.startswith("127."), f"tests talk to loopback only: {addr}"
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": addrs}]}
                               for job, addrs in targets.items()],
        }))
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> Prometheus:
        binary = prometheus_binary()
        assert binary, "prometheus is not installed (hack/install-system-deps.sh)"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
                 "--web.console.templates=/nonexistent", "--web.console.libraries=/nonexistent"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            _kill_and_wait(self.proc.pid, 10)
            self.proc.wait(5)  # reap it
        self.proc = None

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the HTTP API ---

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def has_data(self, expr: str, start: float, end: float) -> bool:
        """Some series has at least one real (not NaN) value in [start, end]."""
        return any(not math.isnan(float(v)) for s in self.query_range(expr, start, end) for _, v in s["values"])

    def alerts(self) -> list[dict[str, Any]]:
        return self.api("alerts")["alerts"]

    def firing(self) -> set[str]:
        return {a["labels"]["alertname"] for a in self.alerts() if a["state"] == "firing"}

    def targets_up(self) -> dict[str, str]:
        return {t["scrapeUrl"]: t["health"] for t in self.api("targets")["activeTargets"]}

"""The /metrics endpoint: Prometheus' text format on /metrics (and its OpenMetrics form when asked),
404 on every other path (a scraper or a probe aimed at the wrong port must not get a 200)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder


def serve_metrics(port: int, addr: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY) -> ThreadingHTTPServer:
    """Serve in a daemon thread; returns the server (`.server_address` has the bound port when `port`
    is 0; `.shutdown()` stops it)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
            if self.path.split("?", 1)[0] != "/metrics":
                self._reply(404, "text/plain; charset=utf-8", b"404 page not found: metrics are at /metrics\n")
                return
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, content_type, encoder(registry))

        def do_HEAD(self) -> None:  # noqa: N802
            self.send_response(200 if self.path.split("?", 1)[0] == "/metrics" else 404)
            self.end_headers()

        def _reply(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:  # scrapes are not news
            pass

    server = ThreadingHTTPServer((addr, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True).start()
    return server

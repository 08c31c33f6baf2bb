"""Ember's metrics endpoint for local runs: Ray's metrics, Ember's series under their own names.

Ray's metrics agent puts every series under its fixed Prometheus namespace, so Ember's
``ember_requests_total`` is ``ray_ember_requests_total`` on Ray's metrics export port. For
``python -m cluster.serve_run`` (and so ``make run``), Ray exports on a private loopback port and
this endpoint serves the same text on the public one (8080), with ``ray_ember_`` renamed
``ember_`` in samples and in ``# HELP`` / ``# TYPE`` lines; Ray's own series pass unchanged. On a
cluster, Prometheus scrapes each node's Ray port and relabels instead
(``cluster/observability/prometheus.yml``).
"""

from __future__ import annotations

import re
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RAY_EMBER = re.compile(r"^(# (?:HELP|TYPE) )?ray_(ember_)", re.M)


def rename(text: str) -> str:
    """Ray's exposition text with Ember's series named ``ember_*``."""
    return _RAY_EMBER.sub(r"\1\2", text)


class MetricsEndpoint:
    """``GET /metrics`` on ``host:port``, read from Ray's export port at ``ray_port`` on each scrape."""

    def __init__(self, ray_port: int, port: int, host: str = "127.0.0.1", timeout_s: float = 10.0):
        source = f"http://127.0.0.1:{ray_port}/metrics"

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] != "/metrics":
                    self._reply(404, b"not found: scrape /metrics\n", "text/plain")
                    return
                try:
                    with urllib.request.urlopen(source, timeout=timeout_s) as r:
                        body = rename(r.read().decode()).encode()
                        ctype = r.headers.get("Content-Type", "text/plain; version=0.0.4")
                except (urllib.error.URLError, OSError) as exc:
                    self._reply(503, f"Ray's metrics at {source} are unavailable: {exc}\n".encode(),
                                "text/plain")
                    return
                self._reply(200, body, ctype)

            def _reply(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # one line per scrape is noise
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="ember-metrics",
                                        daemon=True)

    def start(self) -> "MetricsEndpoint":
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

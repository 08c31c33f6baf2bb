"""Ember's local metrics endpoint: Ray's exposition text with Ember's series named ember_*."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

import pytest

from cluster.metrics_endpoint import MetricsEndpoint, rename

RAY_TEXT = """# HELP ray_ember_requests_total Generation requests.
# TYPE ray_ember_requests_total counter
ray_ember_requests_total{model="m",reason="ray_ember_x"} 3.0
# HELP ray_node_cpu_utilization CPU.
ray_node_cpu_utilization{ip="127.0.0.1"} 12.5
"""


def test_rename_touches_only_embers_series_names() -> None:
    assert rename(RAY_TEXT) == """# HELP ember_requests_total Generation requests.
# TYPE ember_requests_total counter
ember_requests_total{model="m",reason="ray_ember_x"} 3.0
# HELP ray_node_cpu_utilization CPU.
ray_node_cpu_utilization{ip="127.0.0.1"} 12.5
"""


@pytest.fixture
def ray_like_exporter():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = RAY_TEXT.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _get(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_endpoint_serves_rays_metrics_renamed(ray_like_exporter: int) -> None:
    endpoint = MetricsEndpoint(ray_like_exporter, 0).start()
    try:
        status, text = _get(endpoint.port)
        assert status == 200 and text == rename(RAY_TEXT)
        assert _get(endpoint.port, "/other")[0] == 404
    finally:
        endpoint.close()


def test_the_endpoint_says_503_while_rays_exporter_is_down() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nothing listens once the socket closes
    endpoint = MetricsEndpoint(dead, 0).start()
    try:
        status, text = _get(endpoint.port)
        assert status == 503 and "unavailable" in text
    finally:
        endpoint.close()

"""The fault harness, shared by tests/faults and tests/benchmarks/faults.py.

It injects faults into a real Serve app: kill replicas and actors, stop Redis, drop clients.
Every helper here acts on this machine only and ends what it started (a private Redis is stopped
by its pid). The app under test runs SimEngine with a latency model, so requests take long enough
to be caught in every phase.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.conftest import DEMO_KEY, free_port

FAULT_MODEL = "accounts/ember/models/faults"


def fault_config(*, store: str = "memory://", replicas: int = 2, seqs: int = 4, outbox_dir: str | None = None,
                 **ingress) -> dict:
    """A pool whose generation takes ~10 ms a token, so streams last long enough to interrupt."""
    return {
        "models": [{
            "id": FAULT_MODEL, "context_length": 4096, "num_replicas": replicas,
            "resources": {"num_cpus": 0.05},
            "engine": {"kind": "sim", "block_size": 32, "max_num_seqs": seqs, "cache_capacity_tokens": 8192,
                       "stream_interval_s": 0.02,
                       "latency": {"step_base_s": 0.01, "prefill_base_s": 0.005}},
        }],
        "ingress": {"num_cpus": 0.05, "max_completion_tokens": 2000, "max_queue_wait_s": 5.0,
                    "request_timeout_s": 20, "stream_idle_timeout_s": 5, **ingress},
        "store": {"url": store, "outbox_dir": outbox_dir},
        "rate_limit": {"enabled": False},
    }


class App:
    """One deployed app: its URL, and handles to look inside it."""

    def __init__(self, name: str, base: str, config: dict):
        from cluster.config import EmberConfig

        self.name = name
        self.base = base  # .../v1
        self.config = EmberConfig.model_validate(config)

    @property
    def pool_name(self) -> str:
        return self.config.models[0].deployment_name

    def ingress(self):
        from ray import serve

        return serve.get_deployment_handle("ingress", self.name)

    def gate(self) -> dict:
        return self.ingress().gate_state.remote().result(timeout_s=30)[FAULT_MODEL]

    def pool_stats(self, probes: int = 48) -> dict[str, int]:
        """Unfinished engine requests per live pool replica (distinct session keys reach each)."""
        from ray import serve

        pool = serve.get_deployment_handle(self.pool_name, self.name)
        seen: dict[str, int] = {}
        for i in range(probes):
            s = pool.options(session_id=f"probe-{i}").stats.remote().result(timeout_s=30)
            seen[s["replica"]] = s["unfinished"]
        return seen

    def _actors(self, deployment: str) -> list[str]:
        import ray

        prefix = f"SERVE_REPLICA::{self.name}#{deployment}#"
        return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == "serve" and a["name"].startswith(prefix)]

    def kill_replica(self, unique_id: str) -> None:
        import ray

        name = f"SERVE_REPLICA::{self.name}#{self.pool_name}#{unique_id}"
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)

    def kill_ingress(self) -> None:
        import ray

        names = self._actors("ingress")
        assert names, "no ingress replica to kill"
        for name in names:
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)

    def kill_batch_runner(self) -> None:
        import ray

        names = self._actors("batch-runner")
        assert names, "no batch runner replica to kill"
        for name in names:
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)

    def wait_idle(self, timeout_s: float = 30.0) -> dict:
        """Until the gate holds nothing and no engine runs a request; returns the last gate state."""
        deadline = time.monotonic() + timeout_s
        while True:
            gate = self.gate()
            busy = gate["in_flight"] or gate["waiting"] or any(self.pool_stats().values())
            if not busy or time.monotonic() > deadline:
                return gate
            time.sleep(0.1)


class PrivateRedis:
    """A redis-server of our own on a free port, stopped and restarted by its pid."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ember-redis-"))
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        subprocess.run(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--daemonize", "yes",
                        "--pidfile", str(self.dir / "pid"), "--dir", str(self.dir), "--save", "",
                        "--appendonly", "yes"], check=True, capture_output=True)
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).stdout.strip() \
                != b"PONG":
            if time.monotonic() > deadline:
                raise RuntimeError("private redis did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        pid_file = self.dir / "pid"
        if not pid_file.exists():
            return
        pid = int(pid_file.read_text())
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown"], capture_output=True)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, 9)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


AUTH = {"Authorization": f"Bearer {DEMO_KEY}"}

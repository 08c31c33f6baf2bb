"""Autoscaling end to end: a burst on a sim model autoscaling 1 -> 3 on Ember's policy grows the pool,
the ingress gate's slots follow the running replicas, and more replicas serve."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import DEMO_KEY

APP = "autoscale"
MODEL = "accounts/ember/models/autoscaled"
SEQS = 4  # a replica's max_num_seqs: the gate's slots are replicas x SEQS (one ingress)
CLIENTS = 14


def _config() -> dict:
    return {
        "models": [{
            "id": MODEL, "context_length": 512, "resources": {"num_cpus": 0.1},
            "autoscaling": {"min_replicas": 1, "max_replicas": 3, "replica_start_s": 30},
            "engine": {"kind": "sim", "block_size": 32, "max_num_seqs": SEQS, "cache_capacity_tokens": 8192,
                       "latency": {"step_base_s": 0.03}},
        }],
        "ingress": {"num_cpus": 0.1, "max_completion_tokens": 64, "access_log": False},
        "rate_limit": {"enabled": False},
    }


def test_a_burst_scales_the_pool_and_the_gate_follows(serve_instance):
    from ray import serve

    from cluster.builder import build_app

    serve.run(build_app(_config()), name=APP, route_prefix=f"/{APP}")
    ingress = serve.get_deployment_handle("ingress", APP)
    try:
        assert ingress.gate_state.remote().result()[MODEL]["slots"] == SEQS

        url = f"{serve_instance}/{APP}/v1/chat/completions"
        stop = threading.Event()
        replicas: set[str] = set()
        statuses: dict[int, int] = {}
        lock = threading.Lock()

        def client(i: int) -> None:
            with httpx.Client(timeout=90, headers={"Authorization": f"Bearer {DEMO_KEY}"}) as http:
                while not stop.is_set():
                    r = http.post(url, json={"model": MODEL, "max_tokens": 32, "messages": [
                        {"role": "user", "content": f"client {i} says hello"}]})
                    with lock:
                        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                        if r.status_code == 200:
                            replicas.add(r.headers["x-ember-replica"])

        slots_seen = [SEQS]
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(client, i) for i in range(CLIENTS)]
            deadline = time.monotonic() + 60
            try:
                while time.monotonic() < deadline:
                    slots_seen.append(ingress.gate_state.remote().result()[MODEL]["slots"])
                    with lock:
                        served_by = len(replicas)
                    if slots_seen[-1] == 3 * SEQS and served_by == 3:
                        break
                    time.sleep(0.5)  # polling interval, not a timing assertion
            finally:
                stop.set()
            for f in futures:
                f.result()

        state = ingress.gate_state.remote().result()[MODEL]
        assert max(slots_seen) == 3 * SEQS, (slots_seen, state)  # the gate followed 1 -> 3 replicas
        assert slots_seen == sorted(slots_seen)  # it grew (never shrank during the burst)
        assert state["reported"] and state["replicas"] == 3
        assert len(replicas) == 3, replicas
        assert set(statuses) == {200}, statuses  # below the maximum, requests waited: none refused
        assert state["in_flight"] == 0 and state["waiting"] == 0
    finally:
        serve.delete(APP)

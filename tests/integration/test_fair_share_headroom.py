"""Fair share through real Serve: a quiet account is not left waiting behind a noisy one's backlog.

A pool of one SimEngine replica with 4 slots (and, by default, an engine headroom of one more
sequence). A noisy account fills every slot and queues 4 more long requests; then a quiet
account sends one short request. Under fair share the quiet request runs in the headroom at once
and is answered before any noisy request ends; under FCFS it waits behind the whole backlog.
The assertions are on order, not time.
"""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import openai
import pytest

from tests.conftest import ADMIN_TOKEN

MODEL = "accounts/ember/models/fair-headroom"
NOISY_TOKENS = 60  # 60 steps of >= 20 ms: over a second each


def _config(order: str) -> dict:
    return {
        "models": [{"id": MODEL, "context_length": 512, "num_replicas": 1, "resources": {"num_cpus": 0.05},
                    "engine": {"kind": "sim", "block_size": 32, "max_num_seqs": 4,
                               "latency": {"step_base_s": 0.02}}}],
        "ingress": {"num_cpus": 0.05, "queue_order": order, "max_queue_wait_s": 30},
        "rate_limit": {"enabled": False},
    }


@pytest.fixture(scope="module", params=["vtc", "fcfs"])
def fair_app(request, serve_instance):
    from ray import serve

    from cluster.builder import build_app

    name = f"headroom-{request.param}"
    serve.run(build_app(_config(request.param)), name=name, route_prefix=f"/{name}")
    url = f"{serve_instance}/{name}"
    keys = {}
    for acct in ("noisy", "quiet"):
        h = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        assert httpx.post(f"{url}/admin/accounts", json={"id": acct}, headers=h).status_code in (200, 201)
        r = httpx.post(f"{url}/admin/accounts/{acct}/keys", headers=h)
        keys[acct] = r.json()["key"]
    yield {"url": url, "order": request.param, "keys": keys}
    serve.delete(name)


def _gate(app) -> dict:
    from ray import serve

    return serve.get_app_handle(app["url"].rsplit("/", 1)[1]).gate_state.remote().result()[MODEL]


def test_a_quiet_account_is_answered_before_a_noisy_backlog_only_under_fair_share(fair_app):
    clients = {a: openai.OpenAI(base_url=fair_app["url"] + "/v1", api_key=k, max_retries=0, timeout=60)
               for a, k in fair_app["keys"].items()}
    ended: list[tuple[str, int]] = []

    def call(account: str, i: int, max_tokens: int) -> None:
        r = clients[account].chat.completions.create(
            model=MODEL, max_tokens=max_tokens, seed=i,
            messages=[{"role": "user", "content": f"{account} request {i}"}])
        assert r.usage.completion_tokens == max_tokens
        ended.append((account, i))

    with cf.ThreadPoolExecutor(9) as pool:
        noisy = [pool.submit(call, "noisy", i, NOISY_TOKENS) for i in range(8)]
        deadline = time.monotonic() + 30
        g = _gate(fair_app)
        while g["in_flight"] < 4 or g["waiting"] < 4:  # until every slot is taken and 4 wait
            assert time.monotonic() < deadline, g
            time.sleep(0.02)
            g = _gate(fair_app)
        assert g["headroom"] == (1 if fair_app["order"] == "vtc" else 0)
        quiet = pool.submit(call, "quiet", 0, 2)
        quiet.result()
        for f in noisy:
            f.result()
    quiet_at = ended.index(("quiet", 0))
    if fair_app["order"] == "vtc":
        assert quiet_at == 0, ended  # in the headroom at once: before any noisy request ended
    else:
        assert quiet_at >= 4, ended  # behind every noisy request that held a slot or waited before it
    g = _gate(fair_app)
    assert g["in_flight"] == 0 and g["waiting"] == 0

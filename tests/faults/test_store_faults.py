"""Faults of the control plane: the limiter actor dies, Redis stops, the ingress dies with usage
pending. Nothing a client saw goes unbilled, and no limit is reset."""

from __future__ import annotations

import asyncio
import tempfile

import openai
import pytest

from tests.conftest import DEMO_KEY
from tests.faults.harness import FAULT_MODEL, fault_config
from tests.faults.drivers import fresh, usage_totals

LIMIT = 3000
MSG = [{"role": "user", "content": "Count the tokens in this message, please. " * 4}]


def _limited(store: str) -> dict:
    cfg = fault_config(store=store, replicas=1)
    cfg["models"][0]["limits"] = {"floor": {"prompt": LIMIT, "uncached": LIMIT, "generated": LIMIT},
                                  "ceiling": {"prompt": LIMIT, "uncached": LIMIT, "generated": LIMIT}}
    cfg["rate_limit"] = {"enabled": True, "lease_fraction": 0.02}
    return cfg


def _kill_limiter(cfg: dict) -> None:
    import ray

    from cluster.config import EmberConfig
    from policies.consistent_hash import stable_hash

    config = EmberConfig.model_validate(cfg)
    digest = stable_hash(config.rate_limit.model_dump_json() + config.store.url)
    ray.kill(ray.get_actor(f"ember-ratelimit-{digest:016x}-0", namespace="ember"), no_restart=False)


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_limiter_killed_while_an_account_is_at_its_limit_still_refuses(deploy, private_redis, store):
    import time

    cfg = _limited("memory://" if store == "memory" else private_redis.url)
    app = deploy(f"limkill-{store}", cfg)
    client = openai.OpenAI(base_url=app.base, api_key=DEMO_KEY, max_retries=0, timeout=60)
    prompt = client.chat.completions.create(model=FAULT_MODEL, messages=MSG, max_tokens=4).usage.prompt_tokens
    with pytest.raises(openai.RateLimitError):
        for _ in range(100):
            client.chat.completions.create(model=FAULT_MODEL, messages=MSG, max_tokens=4)
    at_limit = time.monotonic()
    _kill_limiter(cfg)
    time.sleep(1.5)  # past the ingress's memory of its last refusal: the next request asks the actor
    admitted = 0
    for _ in range(100):  # until refused again
        try:
            client.chat.completions.create(model=FAULT_MODEL, messages=MSG, max_tokens=4)
            admitted += 1
        except openai.RateLimitError:
            break
    # A reset limit would admit a full bucket (~LIMIT / prompt, about 60 of these requests); a kept
    # one admits only what refilled since the account hit its limit (LIMIT a minute), and the
    # lease this ingress still held.
    refilled = (time.monotonic() - at_limit) * LIMIT / 60 / prompt
    lease = LIMIT * 0.02 / prompt + 1
    assert admitted <= refilled + lease + 1, (admitted, refilled)


def test_redis_outage_then_ingress_kill_loses_no_usage(deploy, private_redis):
    outbox = tempfile.mkdtemp(prefix="ember-outbox-")
    app = deploy("redisdown", fault_config(store=private_redis.url, replicas=1, outbox_dir=outbox))
    first = asyncio.run(fresh(app.base, FAULT_MODEL, n=20))
    assert first.outcomes == {"completed": 20}
    assert usage_totals(app.base)["requests"] == 20
    private_redis.stop()
    during = asyncio.run(fresh(app.base, FAULT_MODEL, n=50))  # fail-open: served, billed later
    assert during.outcomes == {"completed": 50}
    assert app.ingress().flush_usage.remote(0.5).result(timeout_s=30) > 0  # held in the outbox
    app.kill_ingress()  # Serve starts a new ingress replica, which drains the outbox file
    private_redis.start()
    seen = first.completed_usage + during.completed_usage
    expected = {"requests": 70, "completion_tokens": sum(u["completion_tokens"] for u in seen),
                "prompt_tokens": sum(u["prompt_tokens"] for u in seen)}
    totals = _eventually_usage(app, lambda t: t.get("requests", 0) >= 70)
    assert {k: totals[k] for k in expected} == expected


def _eventually_usage(app, done, timeout_s: float = 60.0) -> dict:
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            totals = usage_totals(app.base)
            if done(totals) or time.monotonic() > deadline:
                return totals
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)

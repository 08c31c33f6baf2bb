"""Rate limits over HTTP: headers on every response, 429 with Retry-After, restart and Redis."""

from __future__ import annotations

import os

import openai
import pytest

from tests.conftest import DEMO_KEY

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
MODEL = "accounts/ember/models/limited"
LIMIT = 3000
MSG = [{"role": "user", "content": "Count the tokens in this message, please. " * 4}]


def _app(name: str, store: str, limit: int = LIMIT, **rate_limit) -> dict:
    return {
        "models": [{
            "id": MODEL, "context_length": 512, "num_replicas": 1, "resources": {"num_cpus": 0.1},
            "engine": {"kind": "sim", "block_size": 32},
            "limits": {"floor": {"prompt": limit, "uncached": limit, "generated": limit},
                       "ceiling": {"prompt": limit, "uncached": limit, "generated": limit}},
        }],
        "ingress": {"num_cpus": 0.1},
        "store": {"url": store},
        "rate_limit": {"lease_fraction": 0.02, **rate_limit},
    }


@pytest.fixture(scope="module")
def deploy(serve_instance):
    from ray import serve

    from cluster.builder import build_app

    names = []

    def _deploy(name: str, config: dict) -> openai.OpenAI:
        serve.run(build_app(config), name=name, route_prefix=f"/{name}")
        names.append(name)
        return openai.OpenAI(base_url=f"{serve_instance}/{name}/v1", api_key=DEMO_KEY, max_retries=0, timeout=30)

    yield _deploy
    for n in names:
        serve.delete(n)


def _flush_redis():
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    for k in r.scan_iter("ember:rl:*"):
        r.delete(k)


def test_headers_on_every_response_then_429_with_retry_after(deploy):
    _flush_redis()
    client = deploy("limited", _app("limited", REDIS_URL))
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MSG, max_tokens=4)
    h = raw.headers
    assert int(h["x-ratelimit-limit-tokens-prompt"]) == LIMIT
    assert int(h["x-ratelimit-limit-tokens-cache-adjusted-prompt"]) == LIMIT
    assert int(h["x-ratelimit-limit-tokens-generated"]) == LIMIT
    prompt = raw.parse().usage.prompt_tokens
    assert int(h["x-ratelimit-remaining-tokens-prompt"]) <= LIMIT - prompt
    assert float(h["x-ratelimit-reset-tokens-prompt"]) > 0
    stream = client.chat.completions.with_raw_response.create(model=MODEL, messages=MSG, max_tokens=4, stream=True)
    assert "x-ratelimit-remaining-tokens-prompt" in stream.headers
    list(stream.parse())

    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(LIMIT // prompt + 5):
            client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4)
    err = e.value
    assert err.body["code"] == "rate_limit_exceeded"
    assert err.body["param"] == "prompt" and "prompt tokens per minute" in err.body["message"]
    assert int(err.response.headers["retry-after"]) >= 1
    assert int(err.response.headers["x-ratelimit-remaining-tokens-prompt"]) < prompt


def test_a_restarted_limiter_actor_does_not_reset_the_limit(deploy):
    import ray

    from cluster.config import EmberConfig
    from policies.consistent_hash import stable_hash

    client = deploy("limited", _app("limited", REDIS_URL))  # same app: state from the test above
    with pytest.raises(openai.RateLimitError):
        for _ in range(100):
            client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4)
    config = EmberConfig.model_validate(_app("limited", REDIS_URL))
    digest = stable_hash(config.rate_limit.model_dump_json() + config.store.url)
    actor = ray.get_actor(f"ember-ratelimit-{digest:016x}-0", namespace="ember")
    ray.kill(actor, no_restart=False)
    # The restarted actor starts empty and reads the account's buckets back from Redis.
    zero = {"prompt": 0.0, "uncached": 0.0, "generated": 0.0}
    grant = ray.get(actor.lease.remote(f"demo|{MODEL}", config.models[0], 1, zero, zero), timeout=60)
    assert grant.limits["prompt"] == LIMIT
    assert grant.remaining["prompt"] < LIMIT / 2, grant


def test_requests_per_minute_cap(deploy):
    client = deploy("rpm", _app("rpm", "memory://", limit=1_000_000, requests_per_minute=8))
    for _ in range(8):
        client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=1)
    assert "requests per minute" in e.value.body["message"]


def test_unreachable_redis_fails_closed_when_configured(deploy):
    client = deploy("closed", _app("closed", "redis://127.0.0.1:1/0", on_store_error="closed"))
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=1)
    assert e.value.status_code == 503 and e.value.body["code"] == "store_unavailable"


def test_unreachable_redis_fails_open_when_configured(deploy):
    client = deploy("open", _app("open", "redis://127.0.0.1:1/0", on_store_error="open"))
    resp = client.chat.completions.with_raw_response.create(model=MODEL, messages=MSG, max_tokens=1)
    assert int(resp.headers["x-ratelimit-limit-tokens-prompt"]) == LIMIT

"""Accounts, keys, tiers, billing and lifecycle through the admin CLI and the openai SDK,
on the in-memory store and on real Redis."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os

import httpx
import openai
import pytest

from cluster.cli import main as cli
from tests.conftest import ADMIN_TOKEN, DEMO_KEY

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
TIERED = "accounts/ember/models/tiered"
FAST = "accounts/ember/routers/tiered-fast"
OLD = "accounts/ember/models/old"
GONE = "accounts/ember/models/gone"
PLAIN = "accounts/ember/models/plain"
MSG = [{"role": "user", "content": "Price this request for me, please."}]
# Expensive on purpose, so spend tiers and monthly limits are reached in a few requests.
STD = {"input": 100_000.0, "output": 200_000.0, "cached_input": 25_000.0}
PRIO = {"input": 150_000.0, "output": 300_000.0}


def _model(mid: str, **kw) -> dict:
    return {"id": mid, "context_length": 512, "num_replicas": 1, "resources": {"num_cpus": 0.05},
            "engine": {"kind": "sim", "block_size": 32, "max_num_seqs": 4}, **kw}


def _config(store: str, full: bool) -> dict:
    models = [_model(TIERED, pricing={"standard": STD, "priority": PRIO},
                     engine={"kind": "sim", "block_size": 32, "max_num_seqs": 2,
                             "latency": {"step_base_s": 0.01}})]
    if full:
        models += [
            _model(FAST, pricing={"standard": {"input": 300_000.0, "output": 600_000.0}},
                   engine={"kind": "sim", "block_size": 32, "max_num_seqs": 1}),
            _model(OLD, lifecycle={"status": "deprecated", "deprecated_on": "2026-11-01",
                                   "removal_date": "2027-01-15", "replacement": TIERED}),
            _model(GONE, lifecycle={"status": "removed", "deprecated_on": "2026-09-01",
                                    "removal_date": "2026-10-01", "replacement": TIERED}),
        ]
    return {"models": models, "store": {"url": store},
            "ingress": {"num_cpus": 0.05, "max_queue_wait_s": 0.05, "priority_headroom": 1000}}


@pytest.fixture(scope="module", params=["memory", "redis"])
def app(request, serve_instance):
    from ray import serve

    from cluster.builder import build_app

    if request.param == "redis":
        import redis

        r = redis.Redis.from_url(REDIS_URL)
        for pattern in ("ember:acct:*", "ember:key:*", "ember:keyid:*", "ember:ledger:*"):
            for k in r.scan_iter(pattern):
                r.delete(k)
    name = f"biz-{request.param}"
    store = "memory://" if request.param == "memory" else REDIS_URL
    serve.run(build_app(_config(store, full=request.param == "memory")), name=name, route_prefix=f"/{name}")
    yield {"url": f"{serve_instance}/{name}", "kind": request.param}
    serve.delete(name)


def _cli(app, *args) -> tuple[int, dict | None]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = cli(["--url", app["url"], "--admin-token", ADMIN_TOKEN, *args])
    return code, (json.loads(out.getvalue()) if code == 0 else None)


def _new_account(app, name: str, *flags: str) -> openai.OpenAI:
    code, acct = _cli(app, "accounts", "create", name, *flags)
    assert code == 0 and acct["id"] == name
    code, key = _cli(app, "keys", "create", name)
    assert code == 0 and key["key"].startswith("ember-") and key["id"].startswith("key_")
    return openai.OpenAI(base_url=app["url"] + "/v1", api_key=key["key"], max_retries=0, timeout=30)


def _usage(client) -> dict:
    return client.get("/usage", cast_to=httpx.Response).json()


def test_admin_api_requires_the_admin_token(app):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {DEMO_KEY}"}):
        r = httpx.post(app["url"] + "/admin/accounts", json={"id": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_token"
    assert _cli(app, "accounts", "show", "nobody")[0] == 1
    code = cli(["--url", app["url"], "--admin-token", "wrong", "accounts", "show", "x"])
    assert code == 1


def test_bad_admin_input_is_a_clean_4xx(app):
    h = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for body in ({"id": "Bad Name!"}, {"id": "ok", "spend_tier": 9}, {"id": "ok", "surprise": 1}):
        assert httpx.post(app["url"] + "/admin/accounts", json=body, headers=h).status_code == 400
    assert httpx.post(app["url"] + "/admin/accounts", content=b"{", headers=h).status_code == 400
    _cli(app, "accounts", "create", "dupe")
    assert httpx.post(app["url"] + "/admin/accounts", json={"id": "dupe"}, headers=h).status_code == 409
    assert httpx.delete(app["url"] + "/admin/keys/key_0000000000000000", headers=h).status_code == 404


def test_keys_are_shown_once_work_and_can_be_revoked(app):
    client = _new_account(app, "acme-keys")
    assert client.chat.completions.create(model=TIERED, messages=MSG, max_tokens=2).choices
    code, listing = _cli(app, "keys", "list", "acme-keys")
    assert code == 0 and len(listing["data"]) == 1 and "key" not in listing["data"][0]
    assert _cli(app, "keys", "revoke", listing["data"][0]["id"])[0] == 0
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=TIERED, messages=MSG, max_tokens=2)


def test_usage_is_per_account_and_matches_what_responses_reported(app):
    a = _new_account(app, "acct-a")
    b = _new_account(app, "acct-b")
    sums = {"prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0}
    for i in range(3):
        u = a.chat.completions.create(model=TIERED, messages=MSG, max_tokens=3 + i).usage
        sums["prompt_tokens"] += u.prompt_tokens
        sums["cached_tokens"] += u.prompt_tokens_details.cached_tokens
        sums["completion_tokens"] += u.completion_tokens
    streamed = list(a.chat.completions.create(model=TIERED, messages=MSG, max_tokens=4, stream=True))
    u = streamed[-1].usage
    sums["prompt_tokens"] += u.prompt_tokens
    sums["cached_tokens"] += u.prompt_tokens_details.cached_tokens
    sums["completion_tokens"] += u.completion_tokens
    expected_cost = ((sums["prompt_tokens"] - sums["cached_tokens"]) * STD["input"]
                     + sums["cached_tokens"] * STD["cached_input"] + sums["completion_tokens"] * STD["output"]) / 1e6
    usage = _usage(a)
    rows = [r for r in usage["data"] if r["model"] == TIERED]
    assert len(rows) == 1 and rows[0]["requests"] == 4
    assert {k: rows[0][k] for k in sums} == sums
    assert usage["total_cost_usd"] == pytest.approx(expected_cost, rel=1e-6)
    assert _usage(b)["data"] == []  # b sees nothing of a's
    with pytest.raises(openai.NotFoundError):
        b.get("/accounts/acct-a", cast_to=httpx.Response)
    assert b.get("/accounts/acct-b", cast_to=httpx.Response).json()["id"] == "acct-b"


def test_spend_tier_rises_with_spend(app):
    client = _new_account(app, "acct-grows")
    assert _usage(client)["spend_tier"] == 1
    while _usage(client)["total_cost_usd"] < 50:  # $50 reaches tier 2
        client.chat.completions.create(model=TIERED, messages=MSG, max_tokens=16)
    assert _usage(client)["spend_tier"] == 2
    code, shown = _cli(app, "accounts", "show", "acct-grows")
    assert shown["effective_spend_tier"] == 2


def test_monthly_spend_limit_warns_at_80_percent_then_stops_with_402(app):
    # ~$2.60 a request against $40: warned from $32, refused once a request could pass $40 (each
    # request reserves its worst-case cost at admission).
    client = _new_account(app, "acct-capped", "--monthly-limit", "40")
    warned = False
    with pytest.raises(openai.APIStatusError) as e:
        for _ in range(100):
            raw = client.chat.completions.with_raw_response.create(model=TIERED, messages=MSG, max_tokens=4)
            warned = warned or "x-ember-spend-warning" in raw.headers
    assert e.value.status_code == 402 and e.value.body["code"] == "spend_limit_reached"
    assert warned
    assert _cli(app, "accounts", "update", "acct-capped", "--monthly-limit", "1000")[0] == 0
    assert client.chat.completions.create(model=TIERED, messages=MSG, max_tokens=1).choices


def test_priority_is_echoed_billed_at_its_own_row_and_refused_where_not_offered(app):
    client = _new_account(app, "acct-prio")
    resp = client.chat.completions.create(model=TIERED, messages=MSG, max_tokens=2, service_tier="priority")
    assert resp.service_tier == "priority"
    u = resp.usage
    cost = ((u.prompt_tokens - u.prompt_tokens_details.cached_tokens) * PRIO["input"]
            + u.prompt_tokens_details.cached_tokens * PRIO["input"] / 2 + u.completion_tokens * PRIO["output"]) / 1e6
    assert _usage(client)["total_cost_usd"] == pytest.approx(cost, rel=1e-6)
    assert client.chat.completions.create(model=TIERED, messages=MSG, max_tokens=1,
                                          service_tier="default").service_tier == "default"
    if app["kind"] == "memory":
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=FAST, messages=MSG, max_tokens=1, service_tier="priority")
        assert e.value.body["param"] == "service_tier"


def test_standard_is_shed_with_503_and_priority_is_not(app):
    client = _new_account(app, "acct-load", "--tier", "5")

    def call(tier):
        try:
            client.chat.completions.create(model=TIERED, messages=MSG, max_tokens=30, service_tier=tier)
            return tier, 200, None
        except openai.APIStatusError as exc:
            return tier, exc.status_code, exc.body["code"]

    with cf.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(call, ["default"] * 20 + ["priority"] * 4))
    std = [r for r in results if r[0] == "default"]
    prio = [r for r in results if r[0] == "priority"]
    assert any(code == 503 and why == "overloaded" for _, code, why in std)
    assert all(code in (200, 503) for _, code, _ in std)
    assert all(code == 200 for _, code, _ in prio)
    # Every request got an answer (200 or 503), none a client-side timeout: the pool sheds, never stalls.


def test_fast_variant_has_its_own_pool_and_prices(app):
    if app["kind"] != "memory":
        pytest.skip("the Redis app serves one model")
    client = _new_account(app, "acct-fast")
    base = client.chat.completions.with_raw_response.create(model=TIERED, messages=MSG, max_tokens=1)
    fast = client.chat.completions.with_raw_response.create(model=FAST, messages=MSG, max_tokens=1)
    assert base.headers["x-ember-replica"] != fast.headers["x-ember-replica"]
    rows = {r["model"]: r for r in _usage(client)["data"]}
    fu = fast.parse().usage
    assert rows[FAST]["cost_usd"] == pytest.approx((fu.prompt_tokens * 300_000 + fu.completion_tokens * 600_000) / 1e6)


def test_model_lifecycle(app, openai_schemas):
    if app["kind"] != "memory":
        pytest.skip("the Redis app serves one model")
    client = openai.OpenAI(base_url=app["url"] + "/v1", api_key=DEMO_KEY, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model=OLD, messages=MSG, max_tokens=1)
    assert raw.headers["deprecation"].startswith("@")
    assert raw.headers["sunset"].endswith("GMT") and "2027" in raw.headers["sunset"]
    r = httpx.get(app["url"] + "/v1/models", headers={"Authorization": f"Bearer {DEMO_KEY}"})
    openai_schemas("ListModelsResponse").validate(r.json())
    models = {m["id"]: m for m in r.json()["data"]}
    assert GONE not in models
    assert models[OLD]["status"] == "deprecated" and models[OLD]["shutdown_date"] == "2027-01-15"
    assert models[OLD]["replacement"] == TIERED and models[TIERED]["status"] == "active"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=GONE, messages=MSG)
    assert TIERED in e.value.body["message"] and e.value.body["code"] == "model_removed"

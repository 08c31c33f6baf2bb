"""Pure parts of the embeddings and Responses endpoints: request checks, vector encodings, prices,
the stored-response store's scoping and TTL, and the Responses body and events against the
official shapes."""

from __future__ import annotations

import asyncio
import base64
import json
import struct

import pytest
from pydantic import ValidationError

from cluster.config import ModelConfig
from cluster.stores import MemoryResponseStore
from deployments.billing import price_for
from deployments.embeddings import EmbeddingRequest, encode_base64, normalized_prefix
from deployments.engines.protocol import ChoiceDelta, EngineOutput, Usage
from deployments.responses import ResponsesRenderer, ResponsesRequest
from policies.pricing import Price, request_cost


def test_normalized_prefix_worked_example():
    assert normalized_prefix([0.6, 0.0, 0.8], 2) == [1.0, 0.0]
    assert normalized_prefix([0.6, 0.0, 0.8], 3) == pytest.approx([0.6, 0.0, 0.8])


def test_base64_is_little_endian_float32():
    v = [1.0, -2.5, 0.125]
    raw = base64.b64decode(encode_base64(v))
    assert raw == b"".join(struct.pack("<f", x) for x in v)


@pytest.mark.parametrize("body, ok", [
    ({"input": "text"}, True),
    ({"input": ["a", "b"]}, True),
    ({"input": [1, 2, 3]}, True),
    ({"input": [[1, 2], [3]]}, True),
    ({"input": ""}, False),
    ({"input": []}, False),
    ({"input": ["a", ""]}, False),
    ({"input": [[1], []]}, False),
    ({"input": [-1]}, False),
    ({"input": ["a", 1]}, False),
    ({"input": "a", "encoding_format": "int8"}, False),
    ({"input": "a", "dimensions": 0}, False),
    ({"input": "a", "dimensions": -3}, False),
])
def test_embedding_request_checks(body, ok):
    raw = json.dumps({"model": "m", **body})
    if ok:
        req = EmbeddingRequest.model_validate_json(raw)
        assert isinstance(req.input, list) and all(len(x) for x in req.input)
    else:
        with pytest.raises(ValidationError):
            EmbeddingRequest.model_validate_json(raw)


def test_an_embedding_model_bills_its_own_row_per_input_token():
    model = ModelConfig(id="accounts/ember/models/e", task="embed", embedding={"dimensions": 8},
                        pricing={"embedding": {"input": 0.02}, "standard": {"input": 9.0, "output": 9.0}})
    price, discount = price_for(model, "standard")
    assert (price, discount) == (Price(0.02, 0.02, 0.0), 1.0)
    assert request_cost(price, 1000, 0, 0) == pytest.approx(0.00002)


@pytest.mark.parametrize("kw", [
    {"task": "embed"},
    {"embedding": {"dimensions": 8}},
    {"task": "embed", "embedding": {"dimensions": 8}, "pricing": {"priority": {"input": 1, "output": 1}}},
])
def test_embedding_config_is_all_or_nothing(kw):
    with pytest.raises(ValidationError):
        ModelConfig(id="accounts/ember/models/e", **kw)


def test_stored_responses_are_per_account_and_expire():
    now = [0.0]
    store = MemoryResponseStore(clock=lambda: now[0])

    async def scenario():
        await store.put("alice", "resp_1", {"x": 1}, ttl_s=10)
        assert await store.get("alice", "resp_1") == {"x": 1}
        assert await store.get("bob", "resp_1") is None
        assert not await store.delete("bob", "resp_1")
        assert await store.get("alice", "resp_1") == {"x": 1}
        now[0] = 10.0
        assert await store.get("alice", "resp_1") is None
        await store.put("alice", "resp_2", {"y": 2}, ttl_s=10)
        assert await store.delete("alice", "resp_2")
        assert await store.get("alice", "resp_2") is None

    asyncio.run(scenario())


def _events(stream: bytes) -> list[dict]:
    out = []
    for block in stream.decode().split("\n\n"):
        if block:
            kind, data = block.split("\n")
            event = json.loads(data[len("data: "):])
            assert kind == "event: " + event["type"]
            out.append(event)
    return out


@pytest.mark.parametrize("finish, status", [("stop", "completed"), ("length", "incomplete")])
def test_responses_events_and_body_follow_the_official_shapes(sdk_schemas, finish, status):
    req = ResponsesRequest.model_validate_json(json.dumps(
        {"model": "m", "input": "hi", "instructions": "be brief", "max_output_tokens": 3}))
    r = ResponsesRenderer("resp_abc", "m", req, None)
    outs = [EngineOutput([ChoiceDelta(0, [5], "Hel")]),
            EngineOutput([ChoiceDelta(0, [6, 7], "lo!", finish)], final=True, usage=Usage(9, 3, 0))]
    stream = b"".join(r.opening()) + b"".join(c for o in outs if (c := r.chunk(o))) + b"".join(r.closing(
        r.final(Usage(9, 3, 0))))
    events = _events(stream)
    valid = sdk_schemas("ResponseStreamEvent")
    for e in events:
        valid.validate(e)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", f"response.{status}"]
    final = events[-1]["response"]
    sdk_schemas("Response").validate(final)
    assert final["status"] == status and final["output"][0]["content"][0]["text"] == "Hello!"
    assert final["usage"]["input_tokens"] == 9 and final["usage"]["output_tokens"] == 3
    whole = ResponsesRenderer("resp_abc", "m", req, None).response(outs, Usage(9, 3, 0), 1)
    sdk_schemas("Response").validate(whole)
    assert whole["output"] == final["output"]


def test_responses_tool_calls_become_function_call_items_and_events(sdk_schemas):
    from deployments.tool_calls import ToolCalling

    req = ResponsesRequest.model_validate_json(json.dumps({
        "model": "m", "input": "weather?", "tool_choice": {"type": "function", "name": "get_weather"},
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]}))
    chat = req.to_chat([{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "ok"}])
    assert [m.role for m in chat.messages] == ["user", "assistant", "user"]
    assert chat.tools[0].function.name == "get_weather" and chat.tool_choice.function.name == "get_weather"
    r = ResponsesRenderer("resp_t", "m", req, None, ToolCalling("named", lambda text: (text, []), True, "get_weather"))
    outs = [EngineOutput([ChoiceDelta(0, [5], '{"city": ')]),
            EngineOutput([ChoiceDelta(0, [6], '"Oslo"}', "stop")], final=True, usage=Usage(9, 2, 0))]
    stream = b"".join(r.opening()) + b"".join(c for o in outs if (c := r.chunk(o))) + b"".join(
        r.closing(r.final(Usage(9, 2, 0))))
    events = _events(stream)
    for e in events:
        sdk_schemas("ResponseStreamEvent").validate(e)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    final = events[-1]["response"]
    sdk_schemas("Response").validate(final)
    (item,) = final["output"]
    assert (item["type"], item["name"], json.loads(item["arguments"])) == ("function_call", "get_weather", {"city": "Oslo"})
    turn = r.conversation([])[-1]
    assert turn["tool_calls"][0]["id"] == item["call_id"]
    back = ResponsesRequest.model_validate_json(json.dumps({"model": "m", "input": [
        {"type": "function_call_output", "call_id": item["call_id"], "output": "sunny"}]}))
    assert back.turns() == [{"role": "tool", "tool_call_id": item["call_id"], "content": "sunny"}]


@pytest.mark.parametrize("pieces, text, calls", [
    (["Sure ", "<tool", '_call>{"name": "get_weather", "arguments": {}}</tool_call>'], "Sure ", 1),
    (["a <to", "o> b"], "a <too> b", 0),  # "<to" may begin a tag: held back, then sent at the end
])
def test_responses_with_auto_tools_stream_text_until_a_call_may_begin(sdk_schemas, pieces, text, calls):
    from deployments.tool_calls import ToolCalling, parse_hermes

    req = ResponsesRequest.model_validate_json(json.dumps({
        "model": "m", "input": "weather?",
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]}))
    r = ResponsesRenderer("resp_a", "m", req, None, ToolCalling("auto", parse_hermes, True))
    outs = [EngineOutput([ChoiceDelta(0, [i], p, "stop" if i == len(pieces) - 1 else None)])
            for i, p in enumerate(pieces)]
    chunks = [r.chunk(o) for o in outs]
    assert chunks[0] is not None  # the first text went out before the choice ended
    events = _events(b"".join(r.opening()) + b"".join(c for c in chunks if c) + b"".join(
        r.closing(r.final(Usage(9, len(pieces), 0)))))
    for e in events:
        sdk_schemas("ResponseStreamEvent").validate(e)
    kinds = [e["type"] for e in events]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == text
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == text
    assert [i["type"] for i in final["output"]] == ["message"] + ["function_call"] * calls
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.added"] == list(range(1 + calls))

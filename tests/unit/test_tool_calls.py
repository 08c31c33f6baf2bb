"""Tool-call parsing and constraints, and the sim's schema instances: pure functions, table tests."""

from __future__ import annotations

import importlib.util
import json
import random

import jsonschema
import pytest

from deployments.engines.json_instance import UnsupportedSchema, check, sample
from deployments.openai_api import ChatCompletionRequest
from deployments.tool_calls import ToolCalling, ToolStream, parse_hermes, tool_constraint

HERMES_TEXTS = [
    "no calls here",
    'Sure. <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>',
    '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>{"name": "g", "arguments": {"a": "b"}}</tool_call>',
    '<tool_call>{"name": "f", "arguments": {"x": [1, 2]}}',  # unterminated: vLLM reads it too
    "<tool_call>not json</tool_call>",
]


@pytest.mark.parametrize("text", HERMES_TEXTS)
def test_hermes_parser_reads_what_vllms_hermes_parser_reads(text):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

    class _Tok:  # the parser only needs a tokenizer object for streaming, not for this
        def get_vocab(self):
            return {"<tool_call>": 1, "</tool_call>": 2}

    theirs = Hermes2ProToolParser(_Tok()).extract_tool_calls(text, None)
    content, calls = parse_hermes(text)
    assert [(c.function.name, c.function.arguments) for c in theirs.tool_calls] == calls
    assert theirs.content == content


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}},
    {"type": "function", "function": {"name": "g"}}]


def _req(**kw):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "q"}],
                                                "tools": TOOLS, **kw})


@pytest.mark.parametrize("choice, parallel, text, calls", [
    ("required", True, '[{"name":"f","parameters":{"x":1}},{"name":"g","parameters":{}}]',
     [("f", '{"x": 1}'), ("g", "{}")]),
    ({"type": "function", "function": {"name": "f"}}, True, '{"x":2}', [("f", '{"x":2}')]),
    ({"type": "function", "function": {"name": "f"}}, True, '{"x":', []),  # cut short: no call
])
def test_constrained_output_becomes_calls_and_matches_its_constraint(choice, parallel, text, calls):
    req = _req(tool_choice=choice, parallel_tool_calls=parallel)
    constraint = tool_constraint(req.tools, req.tool_choice, parallel)
    if calls:
        jsonschema.validate(json.loads(text), constraint.json_schema)
    named = choice["function"]["name"] if isinstance(choice, dict) else None
    mode = "named" if named else choice
    assert ToolCalling(mode, parse_hermes, parallel, named).extract(text)[1] == calls


def test_required_without_parallel_allows_one_call():
    req = _req(tool_choice="required", parallel_tool_calls=False)
    schema = tool_constraint(req.tools, "required", False).json_schema
    one = [{"name": "g", "parameters": {}}]
    jsonschema.validate(one, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(one * 2, schema)
    assert tool_constraint(req.tools, "auto", True) is None


SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 3, "maximum": 5}}, "required": ["a"]},
    {"type": "array", "items": {"type": "string", "enum": ["x", "y"]}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"n": {"type": "number", "exclusiveMinimum": 0, "maximum": 0.5}},
     "required": ["n"], "additionalProperties": False},
    {"$defs": {"p": {"type": "object", "properties": {"q": {"type": ["string", "null"], "maxLength": 3}}}},
     "type": "object", "properties": {"p": {"$ref": "#/$defs/p"}}, "required": ["p"]},
    {"anyOf": [{"type": "boolean"}, {"const": 7}]},
    {"type": "integer", "multipleOf": 5, "minimum": 1, "maximum": 19},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_sampled_instances_validate(schema):
    rng = random.Random(1)
    for _ in range(50):
        jsonschema.validate(json.loads(json.dumps(sample(schema, rng))), schema)


@pytest.mark.parametrize("schema, word", [
    ({"type": "string", "pattern": "^a$"}, "pattern"),
    ({"type": "string", "format": "email"}, "format"),
    ({"allOf": [{"type": "string"}]}, "allOf"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "bounds"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems"),
])
def test_what_the_sim_cannot_enforce_is_refused(schema, word):
    with pytest.raises(UnsupportedSchema, match=word):
        sample(schema, random.Random(0))


def test_check_finds_a_keyword_in_a_branch_a_draw_may_skip():
    optional = {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}
    with pytest.raises(UnsupportedSchema, match="pattern"):
        check(optional)
    check(SCHEMAS[3])  # $defs, $ref, type lists: all supported


def _feed(mode, pieces, named=None):
    stream = ToolStream(ToolCalling(mode, parse_hermes, True, named))
    return [stream.feed(p, "stop" if i == len(pieces) - 1 else None) for i, p in enumerate(pieces)]


def test_streamed_auto_text_flows_until_a_tag_then_calls_come_whole():
    out = _feed("auto", ["Hi <tool", "_call>{\"name\": \"f\", ", "\"arguments\": {\"x\": 1}}</tool_call>"])
    assert out[0] == ("Hi ", None, None)  # "<tool" may start a tag: held back
    assert out[1] == (None, None, None)
    content, calls, finish = out[2]
    assert content is None and finish == "tool_calls"
    assert [(c["index"], c["function"]) for c in calls] == [(0, {"name": "f", "arguments": '{"x": 1}'})]
    plain = _feed("auto", ["a <to", "o> b"])
    assert "".join(c or "" for c, _, _ in plain) == "a <too> b" and plain[-1][2] == "stop"


def test_streamed_named_arguments_flow_as_they_come():
    out = _feed("named", ['{"x"', "", ":1}"], named="f")
    assert out[0][1][0]["function"] == {"name": "f", "arguments": '{"x"'} and out[0][1][0]["id"].startswith("call_")
    assert out[1] == (None, None, None)
    assert out[2] == (None, [{"index": 0, "function": {"arguments": ":1}"}}], "tool_calls")


REQUIRED = '[{"name":"f","parameters":{"x":1}},{"name":"g","parameters":{}},{"name":"f","parameters":{"x":'


@pytest.mark.parametrize("text, finish, calls, reason", [
    (REQUIRED + '3}}]', "stop", [("f", '{"x": 1}'), ("g", "{}"), ("f", '{"x": 3}')], "tool_calls"),
    (REQUIRED, "length", [("f", '{"x": 1}'), ("g", "{}")], "length"),  # cut: the whole calls stand
    (REQUIRED[:20], "length", [], "length"),  # not one whole call: the text stays content
    ('[{"name":"f","parameters":{"x":"a\x1f"}}]', "stop", [], "stop"),  # a raw control character is not JSON
])
def test_required_calls_are_the_whole_items_of_the_array(text, finish, calls, reason):
    calling = ToolCalling("required", parse_hermes, True)
    content, got, why = calling.finish(text, finish)
    assert (got, why) == (calls, reason)
    assert content == (None if calls else text)


def test_streamed_required_calls_go_out_as_each_item_is_whole():
    pieces = [REQUIRED[:30], REQUIRED[30:40], REQUIRED[40:60], REQUIRED[60:]]
    out = _feed("required", pieces)  # the last piece ends with finish "stop", but the array is cut
    assert out[0] == (None, None, None)
    assert [(c["index"], c["function"]["name"]) for c in out[1][1]] == [(0, "f")]
    assert out[1][1][0]["id"].startswith("call_") and out[1][1][0]["type"] == "function"
    assert out[2][1] is None and [(c["index"], c["function"]) for c in out[3][1]] == [(1, {"name": "g", "arguments": "{}"})]
    assert out[3][2] == "stop"
    closed = _feed("required", ['[{"name":"g","parameters":{}}', "]"])
    assert closed[0][1][0]["index"] == 0 and closed[1] == (None, None, "tool_calls")
    nothing = _feed("required", ['[{"name":"g","par'])
    assert nothing == [('[{"name":"g","par', None, "stop")]

"""Function calling at the ingress: the constraint a tool choice puts on the output, and the parser
that turns a model's text back into OpenAI ``tool_calls``.

- ``tool_choice: "required"`` constrains the text to a JSON array of ``{"name", "parameters"}``
  objects, one per call, whose ``parameters`` follow that function's schema (as vLLM's own server
  does); ``parallel_tool_calls: false`` limits the array to one item.
- A named function constrains the text to that function's parameters: the text *is* the arguments.
- ``"auto"`` leaves the text free; the model's parser (``ModelConfig.tool_call_parser``) finds the
  calls in it. ``"none"`` never calls.

Parsers are named as vLLM names them and read the same text. ``hermes`` is vLLM's
``Hermes2ProToolParser`` format, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, with
its regex; it is re-stated here because vLLM's parser classes import vLLM (and torch) and want a
transformers tokenizer, which the ingress does not load. ``tests/unit/test_tool_calls.py`` checks it
against vLLM's own parser on the same texts.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Callable

from deployments.engines.protocol import StructuredOutput
from deployments.openai_api import NamedToolChoice, Tool

# (content before the calls or None, [(name, arguments as JSON text)])
ParsedCalls = tuple[str | None, list[tuple[str, str]]]

_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)


def parse_hermes(text: str) -> ParsedCalls:
    if "<tool_call>" not in text:
        return text, []
    try:
        calls = []
        for closed, open_ended in _HERMES.findall(text):
            call = json.loads(closed or open_ended)
            calls.append((call["name"], json.dumps(call["arguments"], ensure_ascii=False)))
    except (ValueError, KeyError, TypeError):
        return text, []  # not a well-formed call: the text stays content, as in vLLM
    return text[:text.find("<tool_call>")] or None, calls


TOOL_CALL_PARSERS: dict[str, Callable[[str], ParsedCalls]] = {"hermes": parse_hermes}


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCalling:
    """How one request's output becomes tool calls (None on requests without tools)."""

    mode: str  # auto | required | named
    parser: Callable[[str], ParsedCalls]
    parallel: bool
    named: str | None = None

    def extract(self, text: str) -> ParsedCalls:
        """The calls in a finished choice's text; unparseable text stays content."""
        if self.mode == "named":
            try:
                json.loads(text)
            except ValueError:
                return text, []  # cut short (finish_reason "length"): no call to show
            return None, [(self.named, text)]
        if self.mode == "required":
            try:
                calls = [(c["name"], json.dumps(c["parameters"], ensure_ascii=False))
                         for c in json.loads(text)]
            except (ValueError, KeyError, TypeError):
                return text, []
            return None, calls
        content, calls = self.parser(text)
        return content, calls if self.parallel else calls[:1]


def tool_constraint(tools: list[Tool], choice, parallel: bool) -> StructuredOutput | None:
    """What ``tool_choice`` constrains the output to, or None when the text stays free."""
    if isinstance(choice, NamedToolChoice):
        fn = next(t.function for t in tools if t.function.name == choice.function.name)
        return StructuredOutput(json_schema=fn.parameters or {"type": "object"})
    if choice != "required":
        return None
    items = [{
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [t.function.name]},
                       "parameters": t.function.parameters or {"type": "object"}},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    } for t in tools]
    schema: dict = {"type": "array", "minItems": 1,
                    "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return StructuredOutput(json_schema=schema)


def tool_call_dicts(calls: list[tuple[str, str]]) -> list[dict]:
    return [{"id": call_id(), "type": "function", "function": {"name": name, "arguments": args}}
            for name, args in calls]

"""Function calling at the ingress: the constraint a tool choice puts on the output, and the parser
that turns a model's text back into OpenAI ``tool_calls``.

- ``tool_choice: "required"`` constrains the text to a JSON array of ``{"name", "parameters"}``
  objects, one per call, whose ``parameters`` follow that function's schema (as vLLM's own server
  does); ``parallel_tool_calls: false`` limits the array to one item. Each item is a call once it
  is whole (``CallArray``): streamed, it goes out then; when ``max_tokens`` cuts the array, the
  whole items before the cut are the calls and ``finish_reason`` stays ``length``.
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
            calls = CallArray().scan(text)
            return (None, calls) if calls else (text, [])
        content, calls = self.parser(text)
        return content, calls if self.parallel else calls[:1]

    def finish(self, text: str, finish: str) -> tuple[str | None, list[tuple[str, str]], str]:
        """(content, calls, finish_reason) of a finished choice: ``tool_calls`` when it called,
        except for a required array cut short (by ``max_tokens``, or a stop string), whose whole
        calls keep the engine's reason."""
        content, calls = self.extract(text)
        if not calls:
            return text, [], finish
        if self.mode == "required":
            array = CallArray()
            array.scan(text)
            if not array.closed:
                return content, calls, finish
        return content, calls, "tool_calls"


_DECODER = json.JSONDecoder()  # strict: a raw control character in a string is not JSON


class CallArray:
    """Reads a required tool choice's text, ``[{"name": .., "parameters": {..}}, ...]``, item by
    item as it grows: ``scan`` returns the calls whose items became whole since the last scan.
    ``closed``: the array ended (``]``). Text that stops being such an array ends the reading
    (``broken``); the calls before it stand.
    """

    def __init__(self):
        self.pos: int | None = None  # where the next token starts (None: before the "[")
        self.after_item = False  # the next token is "," or "]"
        self.count = 0
        self.closed = False
        self.broken = False

    def scan(self, text: str) -> list[tuple[str, str]]:
        new: list[tuple[str, str]] = []
        while not (self.closed or self.broken):
            i = _skip_space(text, 0 if self.pos is None else self.pos)
            if i == len(text):
                break
            if self.pos is None:
                self.broken = text[i] != "["
                self.pos = i + 1
                continue
            if self.after_item or text[i] == "]":
                self.closed = text[i] == "]"
                self.broken = text[i] not in ",]"
                self.pos, self.after_item = i + 1, False
                continue
            try:
                item, end = _DECODER.raw_decode(text, i)
            except ValueError:
                break  # not whole yet (or never: the choice's finish tells)
            if not (isinstance(item, dict) and isinstance(item.get("name"), str) and "parameters" in item):
                self.broken = True
                break
            new.append((item["name"], json.dumps(item["parameters"], ensure_ascii=False)))
            self.pos, self.after_item = end, True
        self.count += len(new)
        return new


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\n\r":
        i += 1
    return i


class ToolStream:
    """One streamed choice of a request with tools: its text becomes OpenAI deltas as early as the
    mode allows.

    - named: the text is the arguments, so they stream as they come, after a first delta that
      carries the call's id and name (OpenAI's shape).
    - auto: text streams as content until a ``<tool_call>`` tag starts (a suffix that may be the
      start of one is held back); from the tag on it is held, and parsed when the choice ends.
    - required: each call goes out whole, in one delta, as soon as its array item is whole.

    ``feed`` returns (content or None, tool-call deltas or None, finish_reason or None).
    Example, named ``f``: feeds ``'{"a"'``, ``':1}'`` (finished) give the deltas
    ``[{"index": 0, "id": "call_..", "type": "function", "function": {"name": "f", "arguments": '{"a"'}}]``,
    then ``[{"index": 0, "function": {"arguments": ":1}"}}]`` with finish_reason "tool_calls".
    """

    TAG = "<tool_call>"

    def __init__(self, calling: ToolCalling):
        self.calling = calling
        self.text = ""
        self.sent = 0  # characters of text sent as content
        self._named_open = False  # named: the call's first delta (id, name) went out
        self._array = CallArray() if calling.mode == "required" else None

    def feed(self, piece: str, finish: str | None) -> tuple[str | None, list[dict] | None, str | None]:
        self.text += piece
        mode = self.calling.mode
        if mode == "named":
            calls = None
            if not self._named_open and (piece or finish):
                calls = [{"index": 0, "id": call_id(), "type": "function",
                          "function": {"name": self.calling.named, "arguments": piece}}]
                self._named_open = True
            elif piece:
                calls = [{"index": 0, "function": {"arguments": piece}}]
            if finish is None:
                return None, calls, None
            return None, calls, "tool_calls" if self.calling.extract(self.text)[1] else finish
        if self._array is not None:
            sent = self._array.count
            found = self._array.scan(self.text)
            calls = [{"index": sent + i, **call} for i, call in enumerate(tool_call_dicts(found))] or None
            if finish is None:
                return None, calls, None
            if not self._array.count:  # not one whole call: the text is what there is
                return self._content(len(self.text)), None, finish
            return None, calls, "tool_calls" if self._array.closed else finish
        if finish is not None:
            content, found, finish = self.calling.finish(self.text, finish)
            if not found:
                return self._content(len(self.text)), None, finish
            rest = self._content(len(content or ""))
            return rest, [{"index": i, **call} for i, call in enumerate(tool_call_dicts(found))], finish
        if mode == "auto" and self.TAG not in self.text:
            return self._content(len(self.text) - _partial_tag(self.text, self.TAG)), None, None
        return None, None, None

    def _content(self, end: int) -> str | None:
        piece = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece or None


def _partial_tag(text: str, tag: str) -> int:
    """How many trailing characters of ``text`` could begin ``tag`` ("ab<tool" → 5)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


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

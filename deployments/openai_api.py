"""OpenAI request models (validated once, at the edge) and the response shapes Ember sends.

Request models convert themselves to engine parameters (``sampling_params``). No field is ignored
silently: a field Ember does not know, or knows and cannot honour on this model (``audio``,
``modalities: ["audio"]``, ``prediction``, image parts, ...), is a 400 whose ``param`` names it, as
OpenAI itself answers an unrecognized argument. Fields that change nothing in the output
(``metadata``, ``store``, ...) are declared and ignored. Every field Ember reads is range-checked.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deployments.engines.protocol import (
    ChoiceDelta,
    EngineMetrics,
    SamplingParams,
    StructuredOutput,
    TokenLogprob,
    Usage,
)

MAX_STOP = 4
INT64 = (-(2**63), 2**63 - 1)  # OpenAI's range for seed; beyond it vLLM's sampler dies
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]  # the vocabulary bound is checked per model
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
MAX_STOP_TOKEN_IDS = 64
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names


class _Req(BaseModel):
    # Unknown fields are refused (errors.py words the 400), never dropped.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _require_strict_json(title: str, data: str | bytes | bytearray) -> None:
    """Refuse `NaN`, `Infinity` and `-Infinity` literals anywhere in a body, ignored fields included.

    pydantic's JSON parser accepts them (range checks catch them only in fields Ember reads), but
    they are not JSON, and a body that is not strict JSON is a 400. The strict parse runs only
    when a literal's name appears in the body at all.
    """
    if isinstance(data, str):
        suspect = "NaN" in data or "Infinity" in data
    else:
        data = data if isinstance(data, (bytes, bytearray)) else bytes(data)
        suspect = b"NaN" in data or b"Infinity" in data
    if not suspect:
        return
    try:
        pydantic_core.from_json(data, allow_inf_nan=False)
    except ValueError as exc:
        try:
            pydantic_core.from_json(data)
        except ValueError:
            return  # malformed anyway: the model's own parse reports it
        raise ValidationError.from_exception_data(title, [{
            "type": "json_invalid", "loc": (), "input": data,
            "ctx": {"error": f"{exc} (NaN and Infinity are not valid JSON numbers)"},
        }]) from None


class TextPart(_Req):
    type: Literal["text"]
    text: str


class FunctionCall(_Req):
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str  # JSON text, as the model produced it


class ToolCall(_Req):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"]
    function: FunctionCall


class Message(_Req):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = Field(None, min_length=1, max_length=256)  # tool turns: the call answered
    refusal: str | None = None  # an assistant turn's refusal: history only, not rendered

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v):
        # A text model cannot see images, audio or files: say so, instead of a union error.
        if isinstance(v, list):
            for i, part in enumerate(v):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"content part {i} has type {kind!r}; this model accepts only "
                                     "text parts")
        return v

    @model_validator(mode="after")
    def _role_fields(self) -> "Message":
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only tool messages carry a tool_call_id")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionDef(_Req):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _schema(cls, v):
        return _check_schema(v) if v is not None else v


class Tool(_Req):
    type: Literal["function"]  # custom tools are not offered: 400 naming tools.N.type
    function: FunctionDef


class NamedFunction(_Req):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(_Req):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormatText(_Req):
    type: Literal["text"]


class ResponseFormatJsonObject(_Req):
    type: Literal["json_object"]


class JsonSchemaFormat(_Req):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _schema(cls, v):
        return _check_schema(v)


class ResponseFormatJsonSchema(_Req):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


class ResponseFormatGrammar(_Req):
    """Fireworks' grammar mode: the output is text of this grammar (GBNF/EBNF or Lark)."""

    type: Literal["grammar"]
    grammar: str = Field(min_length=1, max_length=100_000)


ResponseFormat = Annotated[
    Union[ResponseFormatText, ResponseFormatJsonObject, ResponseFormatJsonSchema, ResponseFormatGrammar],
    Field(discriminator="type"),
]


def _check_schema(schema: dict) -> dict:
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
    return schema


class StreamOptions(_Req):
    include_usage: bool = True
    include_obfuscation: bool | None = None  # padding against side channels: nothing to pad here


class _Body(_Req):
    """A whole request body: strict JSON (no NaN or Infinity anywhere), then the model."""

    @classmethod
    def model_validate_json(cls, json_data, *args, **kwargs):
        _require_strict_json(cls.__name__, json_data)
        return super().model_validate_json(json_data, *args, **kwargs)


class _Common(_Body):
    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, le=1_000_000)
    n: int = Field(1, ge=1, le=128)
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=512)
    prompt_cache_key: str | None = Field(None, max_length=512)
    prompt_cache_max_len: int | None = Field(None, ge=0)
    perf_metrics_in_response: bool = False
    ignore_eos: bool = False
    # Sampling controls, with OpenAI's ranges where OpenAI documents them (vLLM's otherwise).
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    min_p: float = Field(0.0, ge=0, le=1)
    logit_bias: dict[str, float] | None = None
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    min_tokens: int = Field(0, ge=0, le=2**31 - 1)
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        # OpenAI: keys are token ids (as JSON object keys, so strings), values in [-100, 100].
        if v is None:
            return None
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries are allowed")
        for key, bias in v.items():
            if not key.isdigit() or int(key) > 2**31 - 1:
                raise ValueError(f"key {key!r} is not a token id")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias {bias} for token {key} is outside [-100, 100]")
        return v

    @property
    def include_usage(self) -> bool:
        # Ember sends usage on the final chunk by default; callers may opt out.
        return self.stream_options is None or self.stream_options.include_usage

    @property
    def use_cache(self) -> bool:
        return self.prompt_cache_max_len != 0

    def token_ids_named(self) -> dict[str, list[int]]:
        """The token ids the request names, by field, for the per-model vocabulary check."""
        return {"logit_bias": [int(k) for k in self.logit_bias or ()],
                "stop_token_ids": list(self.stop_token_ids or ())}

    def structured(self) -> StructuredOutput | None:
        rf = self.response_format
        if isinstance(rf, ResponseFormatJsonObject):
            return StructuredOutput(json_object=True)
        if isinstance(rf, ResponseFormatJsonSchema):
            return StructuredOutput(json_schema=rf.json_schema.schema_)
        if isinstance(rf, ResponseFormatGrammar):
            return StructuredOutput(grammar=rf.grammar)
        return None

    def _logprobs_k(self) -> int | None:
        return None

    def sampling_params(self, max_tokens: int, structured: StructuredOutput | None = None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            n=self.n,
            seed=self.seed,
            stop=list(self.stop or ()),
            logprobs=self._logprobs_k(),
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            min_p=self.min_p,
            logit_bias={int(k): b for k, b in (self.logit_bias or {}).items()},
            stop_token_ids=list(self.stop_token_ids or ()),
            min_tokens=self.min_tokens,
            structured=structured or self.structured(),
        )


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    service_tier: Literal["auto", "default", "priority", "flex", "scale", "fast"] | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    # Only text out: asking for audio is refused here (the `audio` field is unknown, so refused too).
    modalities: list[Literal["text"]] | None = None
    # Change nothing in the output: accepted and ignored (README, "Request fields").
    metadata: dict[str, str] | None = None
    store: bool | None = None
    safety_identifier: str | None = Field(None, max_length=512)
    prompt_cache_retention: str | None = None

    @model_validator(mode="after")
    def _checks(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def _logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Common):
    prompt: Union[str, list[TokenId], list[str], list[list[TokenId]]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1)  # one candidate per choice; more is not offered

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        # A list of strings or of token lists is a batch; Ember takes one prompt per request.
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("send one prompt per request; for many prompts, upload a JSONL file to "
                                 "/v1/files (purpose=batch) and create a job at /v1/batches")
            v = v[0]
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix (fill-in-the-middle) is not supported")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        # OpenAI's legacy completions default to 16 tokens.
        return self.max_tokens if self.max_tokens is not None else 16

    def _logprobs_k(self) -> int | None:
        return self.logprobs


# -- responses --------------------------------------------------------------------------


def usage_dict(u: Usage) -> dict:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def perf_metrics(u: Usage, m: EngineMetrics) -> dict:
    return {
        "prompt-tokens": u.prompt_tokens,
        "cached-prompt-tokens": u.cached_tokens,
        "server-time-to-first-token": round(m.time_to_first_token_s, 6),
        "server-processing-time": round(m.processing_time_s, 6),
    }


def perf_headers(u: Usage, m: EngineMetrics) -> dict[str, str]:
    return {"fireworks-" + k: str(v) for k, v in perf_metrics(u, m).items()}


def _chat_logprobs(lps: list[TokenLogprob] | None) -> dict | None:
    if lps is None:
        return None
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.token.encode()),
                "top_logprobs": [{"token": t, "logprob": p, "bytes": list(t.encode())} for t, p in lp.top],
            }
            for lp in lps
        ],
        "refusal": None,
    }


def _completion_logprobs(lps: list[TokenLogprob] | None, offset: int) -> dict | None:
    if lps is None:
        return None
    offsets, pos = [], offset
    for lp in lps:
        offsets.append(pos)
        pos += len(lp.token)
    return {
        "tokens": [lp.token for lp in lps],
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [dict(lp.top) for lp in lps],
        "text_offset": offsets,
    }


class ChoiceAccumulator:
    """Collects a choice's deltas for a non-streamed response."""

    __slots__ = ("text", "finish_reason", "logprobs")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] | None = None

    def add(self, d: ChoiceDelta) -> None:
        self.text.append(d.text)
        if d.finish_reason:
            self.finish_reason = d.finish_reason
        if d.logprobs is not None:
            self.logprobs = (self.logprobs or []) + d.logprobs


def chat_message(text: str, tool_calls: list[dict] | None) -> dict:
    message = {"role": "assistant", "content": text or None if tool_calls else text, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def chat_response(rid: str, created: int, model: str, choices: list[tuple[dict, str, list | None]],
                  usage: Usage, tier: str | None) -> dict:
    """``choices``: (message, finish_reason, logprobs) per choice."""
    body = {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": i, "message": message, "logprobs": _chat_logprobs(lps), "finish_reason": finish}
            for i, (message, finish, lps) in enumerate(choices)
        ],
        "usage": usage_dict(usage),
    }
    if tier:
        body["service_tier"] = tier
    return body


def completion_response(rid: str, created: int, model: str, choices: list[ChoiceAccumulator],
                        usage: Usage) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "text": "".join(c.text),
                "logprobs": _completion_logprobs(c.logprobs, 0),
                "finish_reason": c.finish_reason or "stop",
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage_dict(usage),
    }


def chat_chunk(rid: str, created: int, model: str, deltas: list[dict], tier: str | None) -> dict:
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": deltas}
    if tier:
        body["service_tier"] = tier
    return body


def chat_delta(d: ChoiceDelta, first: bool) -> dict:
    delta: dict = {"content": d.text}
    if first:
        delta["role"] = "assistant"
    return {"index": d.index, "delta": delta, "logprobs": _chat_logprobs(d.logprobs),
            "finish_reason": d.finish_reason}


def chat_tool_delta(index: int, first: bool, content: str | None, tool_calls: list[dict] | None,
                    finish_reason: str | None) -> dict:
    """A streamed choice of a request with tools (``tool_calls`` entries carry their ``index``)."""
    delta: dict = {"content": content}
    if first:
        delta["role"] = "assistant"
    if tool_calls:
        delta["tool_calls"] = tool_calls
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def completion_chunk(rid: str, created: int, model: str, choices: list[dict]) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}


def completion_delta(d: ChoiceDelta, offset: int) -> dict:
    return {"index": d.index, "text": d.text, "logprobs": _completion_logprobs(d.logprobs, offset),
            "finish_reason": d.finish_reason}

"""OpenAI request models (validated once, at the edge) and the response shapes Ember sends.

Request models convert themselves to engine parameters (``sampling_params``). Unknown fields are
ignored, as OpenAI-compatible servers do, but every field Ember reads is range-checked.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deployments.engines.protocol import (
    ChoiceDelta,
    EngineMetrics,
    SamplingParams,
    TokenLogprob,
    Usage,
)

MAX_STOP = 4
INT64 = (-(2**63), 2**63 - 1)  # OpenAI's range for seed; beyond it vLLM's sampler dies
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]  # the vocabulary bound is checked per model


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


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


class Message(_Req):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Req):
    include_usage: bool = True


class _Common(_Req):
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

    @classmethod
    def model_validate_json(cls, json_data, *args, **kwargs):
        _require_strict_json(cls.__name__, json_data)
        return super().model_validate_json(json_data, *args, **kwargs)

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

    @property
    def include_usage(self) -> bool:
        # Ember sends usage on the final chunk by default; callers may opt out.
        return self.stream_options is None or self.stream_options.include_usage

    @property
    def use_cache(self) -> bool:
        return self.prompt_cache_max_len != 0

    def _logprobs_k(self) -> int | None:
        return None

    def sampling_params(self, max_tokens: int) -> SamplingParams:
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
        )


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    service_tier: Literal["auto", "default", "priority", "flex", "scale", "fast"] | None = None

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

    @model_validator(mode="after")
    def _unsupported(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

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


def chat_response(rid: str, created: int, model: str, choices: list[ChoiceAccumulator], usage: Usage,
                  tier: str | None) -> dict:
    body = {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(c.text), "refusal": None},
                "logprobs": _chat_logprobs(c.logprobs),
                "finish_reason": c.finish_reason or "stop",
            }
            for i, c in enumerate(choices)
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


def completion_chunk(rid: str, created: int, model: str, choices: list[dict]) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}


def completion_delta(d: ChoiceDelta, offset: int) -> dict:
    return {"index": d.index, "text": d.text, "logprobs": _completion_logprobs(d.logprobs, offset),
            "finish_reason": d.finish_reason}

"""The engine seam: what a model-pool replica needs from an inference engine.

Streaming convention (written down once, every engine follows it):

- ``generate(request)`` is an async iterator of ``EngineOutput``.
- Each output carries *deltas*: the tokens and text produced since the previous output, per choice
  (``ChoiceDelta.index`` in ``range(request.sampling.n)``). An engine may put several tokens in one
  delta; callers must not assume one token per output.
- A choice is finished when its delta has ``finish_reason`` set ("stop" or "length"); after that no
  more deltas come for that index.
- The last output of the stream has ``final`` set and carries ``usage`` and ``metrics``. Nothing
  follows it. Usage counts the prompt once, however many choices there are.
- The first output that carries a token also carries ``cached_tokens`` (how many prompt tokens
  the prefix cache served), so a stream cut short is still billed at the cached rate.
- ``abort(request_id)`` stops a running request; its stream then ends without a final output.
- Errors in the request itself (for example a prompt longer than the model) raise
  ``EngineRequestError``. An engine that can serve nothing more raises ``EngineDeadError`` (from
  ``generate`` and from ``check_health``), so that Serve replaces its replica; everything else is
  a fault of this one request.

Embedding convention (models with ``task: embed``):

- ``embed(request)`` takes an ``EmbedRequest`` (one or more token-id inputs) and returns one
  ``EngineOutput`` with ``final`` set, ``embeddings`` holding one vector per input in input order
  (the model's full size, L2-normalised), no deltas, and ``usage`` counting every input token as
  a prompt token (``completion_tokens=0``, ``cached_tokens=0``).
- An ``EmbedRequest`` looks like a prompt-only ``EngineRequest`` to the ingress's lifecycle: its
  ``prompt_token_ids`` are all inputs in a row and its ``sampling`` allows no output, so
  admission, rate limits and billing treat it as a prompt with nothing generated.
- Errors follow the generation rules (``EngineRequestError``, ``EngineDeadError``); a generative
  engine that is asked to embed, or an embedding engine asked to generate, raises
  ``EngineRequestError``.

Example: ``EmbedRequest("e1", [[5, 6], [7]])`` returns
``EngineOutput([], final=True, embeddings=[[...], [...]], usage=Usage(3, 0, 0))``.

Example: a request with ``max_tokens=3`` and ``n=1`` may stream
``[ChoiceDelta(0, [5], "a")]``, ``[ChoiceDelta(0, [9, 2], " bc", finish_reason="length")]`` and then
a final output with ``usage=Usage(prompt_tokens=7, completion_tokens=3, cached_tokens=0)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol, runtime_checkable


@dataclass(slots=True)
class StructuredOutput:
    """A constraint on a choice's whole text, enforced while decoding (exactly one is set).

    ``json_schema``: a JSON instance of this JSON Schema; ``json_object``: any JSON object;
    ``grammar``: text of this grammar (vLLM's backends: EBNF / Lark). An engine that cannot enforce
    a constraint raises ``EngineRequestError`` (param ``response_format``) rather than ignore it.
    """

    json_schema: dict | None = None
    json_object: bool = False
    grammar: str | None = None


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: no logprobs; k: the sampled token plus top-k alternatives
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    # Added to the logits of these token ids; -100 bans a token, +100 all but forces it.
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Generating one of these ends the choice with "stop"; the token counts, its text is not sent.
    stop_token_ids: list[int] = field(default_factory=list)
    # No EOS or stop_token_ids are drawn before this many tokens, and stop strings count only
    # in text after them (vLLM's rules).
    min_tokens: int = 0
    structured: StructuredOutput | None = None


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    # Isolates prefix caches between accounts; None disables caching for this request only when
    # ``use_cache`` is False (see below), otherwise the engine's shared cache is used.
    cache_salt: str | None = None
    use_cache: bool = True
    priority: int = 0  # lower is served first (vLLM's convention)
    # Continues a session (policies.affinity.continues_session): the router waits a moment for the
    # session's owner when it is full, rather than losing the cached prefix at another replica.
    returning: bool = False
    # The request's trace context as a W3C carrier ({"traceparent": ...}), for the router's and the
    # replica's spans; None when the request is not traced (deployments/telemetry.py).
    trace_context: dict[str, str] | None = None


_NO_OUTPUT = SamplingParams(max_tokens=0)


@dataclass(slots=True)
class EmbedRequest:
    request_id: str
    inputs: list[list[int]]  # token ids, one list per input
    priority: int = 0
    trace_context: dict[str, str] | None = None  # as EngineRequest's

    @property
    def prompt_token_ids(self) -> list[int]:
        """Every input's tokens in a row: what admission and billing count."""
        return [t for ids in self.inputs for t in ids]

    @property
    def sampling(self) -> SamplingParams:
        return _NO_OUTPUT


@dataclass(slots=True)
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass(slots=True)
class ChoiceDelta:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class EngineMetrics:
    # Seconds, measured by the engine from the moment it received the request.
    time_to_first_token_s: float
    processing_time_s: float
    queue_s: float | None = None  # waiting for a place in the engine's batch, when the engine says


@dataclass(slots=True)
class EngineOutput:
    deltas: list[ChoiceDelta]
    final: bool = False
    usage: Usage | None = None
    metrics: EngineMetrics | None = None
    # On the first output with a token: prompt tokens served from the prefix cache.
    cached_tokens: int | None = None
    replica: str | None = None  # set by the model pool on final outputs: which replica served it
    # Also set there: when the replica started and finished the request (Unix seconds).
    replica_span: tuple[float, float] | None = None
    embeddings: list[list[float]] | None = None  # EmbedRequest only: one vector per input


class EngineRequestError(ValueError):
    """The request cannot run on this engine (bad parameters, too long a prompt)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class EngineDeadError(RuntimeError):
    """The engine can serve no more requests; its replica must be replaced."""


@runtime_checkable
class Engine(Protocol):
    async def start(self) -> None:
        """Load weights / warm up. Called once before the first request."""

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Stream outputs for one request, following the convention above."""

    async def abort(self, request_id: str) -> None:
        """Stop a running request and free its resources."""

    async def embed(self, request: EmbedRequest) -> EngineOutput:
        """Embed every input of the request (embedding models; see the convention above)."""

    async def check_health(self) -> None:
        """Return if the engine can serve; raise ``EngineDeadError`` if it cannot."""

    async def shutdown(self) -> None:
        """Release the engine; no call may follow."""


def check_embed_inputs(request: "EmbedRequest", context_length: int, embeds: bool) -> None:
    """What every engine refuses in an embedding request: a text model, an empty input, an input
    longer than the context (``EngineRequestError`` naming the parameter)."""
    if not embeds:
        raise EngineRequestError("this model generates text; it does not embed", param="model")
    for ids in request.inputs:
        if not ids:
            raise EngineRequestError("an input must contain at least one token", param="input")
        if len(ids) > context_length:
            raise EngineRequestError(f"an input is {len(ids)} tokens; this model's maximum context length "
                                     f"is {context_length} tokens", param="input")


def merge_outputs(outputs: list[EngineOutput]) -> EngineOutput:
    """Coalesce consecutive outputs into one, concatenating each choice's deltas.

    Example: ``[ChoiceDelta(0, [1], "a")]`` then ``[ChoiceDelta(0, [2], "b", "stop")]`` merge into
    ``[ChoiceDelta(0, [1, 2], "ab", "stop")]``; the final flag, usage and metrics of the last output
    that has them win.
    """
    if len(outputs) == 1:
        return outputs[0]
    by_index: dict[int, ChoiceDelta] = {}
    merged = EngineOutput(deltas=[])
    for out in outputs:
        for d in out.deltas:
            cur = by_index.get(d.index)
            if cur is None:
                cur = ChoiceDelta(d.index, list(d.token_ids), d.text, d.finish_reason,
                                  list(d.logprobs) if d.logprobs is not None else None)
                by_index[d.index] = cur
                merged.deltas.append(cur)
            else:
                cur.token_ids.extend(d.token_ids)
                cur.text += d.text
                cur.finish_reason = d.finish_reason or cur.finish_reason
                if d.logprobs is not None:
                    cur.logprobs = (cur.logprobs or []) + d.logprobs
        if out.final:
            merged.final = True
        if out.usage is not None:
            merged.usage = out.usage
        if out.metrics is not None:
            merged.metrics = out.metrics
        if out.cached_tokens is not None and merged.cached_tokens is None:
            merged.cached_tokens = out.cached_tokens
        if out.replica is not None:
            merged.replica = out.replica
        if out.embeddings is not None:
            merged.embeddings = out.embeddings
    return merged

"""Per-endpoint serving: what each generation endpoint makes of a request, and how it renders.

``ChatServing`` and ``CompletionServing`` each turn a validated body into a ``Job`` (the engine
request plus what the response needs) and render engine outputs as a whole response or as SSE
chunks. They hold no state about a running request: that is ``deployments.lifecycle``'s job.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from cluster.config import EmberConfig, ModelConfig
from deployments.engines.protocol import EngineMetrics, EngineOutput, EngineRequest, Usage
from deployments.errors import bad_request
from deployments.openai_api import (
    ChatCompletionRequest,
    ChoiceAccumulator,
    CompletionRequest,
    chat_chunk,
    chat_delta,
    chat_response,
    completion_chunk,
    completion_delta,
    completion_response,
    perf_metrics,
    usage_dict,
)
from deployments.prompts import PromptBuilder
from policies.affinity import session_key
from policies.tiers import ENGINE_PRIORITY

AFFINITY_HEADER = "x-session-affinity"


def dumps(obj: Any) -> bytes:
    # allow_nan=False: a body is strict JSON or the request fails loudly, never `-Infinity`.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class Job:
    """One generation request, ready for the lifecycle."""

    model: ModelConfig
    engine_request: EngineRequest
    session: str
    stream: bool
    include_usage: bool
    perf_in_body: bool
    billed_tier: str  # priority | standard | batch
    renderer: "Renderer"
    # The id the ledger dedupes on; None: the engine request's id. A batch line keeps one op id
    # over its attempts (each attempt has its own engine request id), so it is billed once.
    op_id: str | None = None

    def as_batch_line(self, op_id: str) -> "Job":
        """This request as a line of a batch: lowest engine priority, billed at the batch rate
        under ``op_id``, never streamed."""
        self.billed_tier = "batch"
        self.engine_request.priority = ENGINE_PRIORITY["batch"]
        self.stream = False
        self.op_id = op_id
        return self


class Renderer:
    """Renders one request's outputs; a subclass per endpoint."""

    def __init__(self, rid: str, model_id: str):
        self.rid = rid
        self.model_id = model_id
        self.created = int(time.time())

    def response(self, outs: list[EngineOutput], usage: Usage, n: int) -> dict:
        choices = [ChoiceAccumulator() for _ in range(n)]
        for out in outs:
            for d in out.deltas:
                choices[d.index].add(d)
        return self._body(choices, usage)

    def chunk(self, out: EngineOutput) -> bytes | None:
        raise NotImplementedError

    def tail(self, usage: Usage, metrics: EngineMetrics | None, include_usage: bool) -> bytes:
        body = self._chunk_body([])
        if include_usage:
            body["usage"] = usage_dict(usage)
        if metrics is not None:
            body["perf_metrics"] = perf_metrics(usage, metrics)
        return sse(body)

    def _body(self, choices: list[ChoiceAccumulator], usage: Usage) -> dict:
        raise NotImplementedError

    def _chunk_body(self, choices: list[dict]) -> dict:
        raise NotImplementedError


class ChatRenderer(Renderer):
    def __init__(self, rid: str, model_id: str, tier: str | None):
        super().__init__(rid, model_id)
        self.tier = tier  # echoed as service_tier (None: the caller did not ask)
        self._started: set[int] = set()

    def chunk(self, out: EngineOutput) -> bytes | None:
        if not out.deltas:
            return None
        deltas = []
        for d in out.deltas:
            deltas.append(chat_delta(d, d.index not in self._started))
            self._started.add(d.index)
        return sse(self._chunk_body(deltas))

    def _body(self, choices, usage):
        return chat_response(self.rid, self.created, self.model_id, choices, usage, self.tier)

    def _chunk_body(self, choices):
        return chat_chunk(self.rid, self.created, self.model_id, choices, self.tier)


class CompletionRenderer(Renderer):
    def __init__(self, rid: str, model_id: str):
        super().__init__(rid, model_id)
        self._offsets: dict[int, int] = {}

    def chunk(self, out: EngineOutput) -> bytes | None:
        if not out.deltas:
            return None
        choices = []
        for d in out.deltas:
            off = self._offsets.get(d.index, 0)
            choices.append(completion_delta(d, off))
            self._offsets[d.index] = off + len(d.text)
        return sse(self._chunk_body(choices))

    def _body(self, choices, usage):
        return completion_response(self.rid, self.created, self.model_id, choices, usage)

    def _chunk_body(self, choices):
        return completion_chunk(self.rid, self.created, self.model_id, choices)


class _Serving:
    def __init__(self, config: EmberConfig, prompts: dict[str, PromptBuilder], model_for):
        self.config = config
        self.prompts = prompts
        self._model_for = model_for  # (id, account) -> ModelConfig, or raises the 404

    def _max_tokens(self, model: ModelConfig, n_prompt: int, requested: int | None, param: str) -> int:
        ctx = model.context_length
        if n_prompt >= ctx:
            raise bad_request(
                f"this model's maximum context length is {ctx} tokens, but the prompt is "
                f"{n_prompt} tokens; shorten it", param="messages" if param != "max_tokens" else "prompt",
                code="context_length_exceeded")
        cap = self.config.ingress.max_completion_tokens
        if requested is None:
            return min(cap, ctx - n_prompt)
        if requested > cap:
            raise bad_request(f"{param} is {requested}; the most this server allows is {cap}", param=param)
        if n_prompt + requested > ctx:
            raise bad_request(
                f"this model's maximum context length is {ctx} tokens; you requested "
                f"{n_prompt + requested} ({n_prompt} in the prompt, {requested} for the completion)",
                param=param, code="context_length_exceeded")
        return requested

    def _job(self, rid: str, account: str, model: ModelConfig, req, prompt_ids: list[int], max_tokens: int,
             session: str, billed_tier: str, renderer: Renderer) -> Job:
        if req.n > self.config.ingress.max_n:
            raise bad_request(f"n is {req.n}; at most {self.config.ingress.max_n} choices per request",
                              param="n")
        return Job(
            model=model,
            engine_request=EngineRequest(
                request_id=rid,
                prompt_token_ids=prompt_ids,
                sampling=req.sampling_params(max_tokens),
                cache_salt=account,  # one prefix cache per account: no cross-account timing leaks
                use_cache=req.use_cache,
                priority=ENGINE_PRIORITY[billed_tier],
            ),
            session=session,
            stream=req.stream,
            include_usage=req.include_usage,
            perf_in_body=req.perf_metrics_in_response,
            billed_tier=billed_tier,
            renderer=renderer,
        )


class ChatServing(_Serving):
    def prepare(self, rid: str, account: str, body: bytes, headers) -> Job:
        req = ChatCompletionRequest.model_validate_json(body)
        model = self._model_for(req.model, account)
        tier, billed_tier = _tier(req.service_tier, model)
        if len(req.messages) >= model.context_length:
            # Every message costs at least its role token: this cannot fit, so say so before the
            # (costly) rendering and tokenizing.
            raise bad_request(f"{len(req.messages)} messages cannot fit this model's context of "
                              f"{model.context_length} tokens", param="messages", code="context_length_exceeded")
        try:
            prompt_ids = self.prompts[model.id].chat(req.messages)
        except ValueError as exc:  # the template rejected the conversation
            raise bad_request(str(exc), param="messages") from exc
        max_tokens = self._max_tokens(model, len(prompt_ids), req.requested_max_tokens,
                                      "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        session = session_key(account, header=headers.get(AFFINITY_HEADER),
                              prompt_cache_key=req.prompt_cache_key, user=req.user,
                              messages=((m.role, m.text) for m in req.messages))
        rid = "chatcmpl-" + rid
        return self._job(rid, account, model, req, prompt_ids, max_tokens, session, billed_tier,
                         ChatRenderer(rid, model.id, tier))


class CompletionServing(_Serving):
    def prepare(self, rid: str, account: str, body: bytes, headers) -> Job:
        req = CompletionRequest.model_validate_json(body)
        model = self._model_for(req.model, account)
        builder = self.prompts[model.id]
        if isinstance(req.prompt, str):
            prompt_ids = builder.text(req.prompt)
        else:
            vocab = builder.vocab_size()
            if any(t >= vocab for t in req.prompt):
                raise bad_request(f"prompt holds token ids outside the vocabulary (size {vocab})",
                                  param="prompt")
            prompt_ids = list(req.prompt)
        if not prompt_ids:
            raise bad_request("prompt must not be empty", param="prompt")
        max_tokens = self._max_tokens(model, len(prompt_ids), req.requested_max_tokens, "max_tokens")
        session = session_key(account, header=headers.get(AFFINITY_HEADER),
                              prompt_cache_key=req.prompt_cache_key, user=req.user, prompt_ids=prompt_ids)
        rid = "cmpl-" + rid
        return self._job(rid, account, model, req, prompt_ids, max_tokens, session, "standard",
                         CompletionRenderer(rid, model.id))


def _tier(service_tier: str | None, model: ModelConfig) -> tuple[str | None, str]:
    """(the tier echoed in the response, the tier served and billed)."""
    if service_tier in (None, "auto", "default"):
        return ("default" if service_tier else None), "standard"
    if service_tier == "priority" and model.pricing.priority is not None:
        return "priority", "priority"
    offered = "default or priority" if model.pricing.priority is not None else "default"
    raise bad_request(f"service_tier '{service_tier}' is not available for {model.id}; it offers {offered}",
                      param="service_tier", code="unsupported_service_tier")

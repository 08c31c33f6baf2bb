"""Per-endpoint serving: what each generation endpoint makes of a request, and how it renders.

``ChatServing`` and ``CompletionServing`` each turn a validated body into a ``Job`` (the engine
request plus what the response needs) and render engine outputs as a whole response or as SSE
chunks. They hold no state about a running request: that is ``deployments.lifecycle``'s job.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Any

from cluster.config import EmberConfig, ModelConfig
from deployments.engines.protocol import EngineMetrics, EngineOutput, EngineRequest, Usage
from deployments.errors import bad_request
from deployments.openai_api import (
    ChatCompletionRequest,
    ChoiceAccumulator,
    CompletionRequest,
    NamedToolChoice,
    chat_chunk,
    chat_delta,
    chat_message,
    chat_tool_delta,
    chat_response,
    completion_chunk,
    completion_delta,
    completion_response,
    perf_metrics,
    usage_dict,
)
from deployments.prompts import PromptBuilder
from deployments.tool_calls import TOOL_CALL_PARSERS, ToolCalling, ToolStream, tool_call_dicts, tool_constraint
from policies.affinity import continues_session, session_key
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
    def __init__(self, rid: str, model_id: str, tier: str | None, tools: ToolCalling | None = None):
        super().__init__(rid, model_id)
        self.tier = tier  # echoed as service_tier (None: the caller did not ask)
        self.tools = tools
        self._started: set[int] = set()
        self._streams: dict[int, ToolStream] = {}  # with tools: each streamed choice's state

    def chunk(self, out: EngineOutput) -> bytes | None:
        if not out.deltas:
            return None
        deltas = []
        for d in out.deltas:
            first = d.index not in self._started
            self._started.add(d.index)
            if self.tools is None:
                deltas.append(chat_delta(d, first))
                continue
            stream = self._streams.get(d.index)
            if stream is None:
                stream = self._streams[d.index] = ToolStream(self.tools)
            content, calls, finish = stream.feed(d.text, d.finish_reason)
            if first or content or calls or finish:
                deltas.append(chat_tool_delta(d.index, first, content, calls, finish))
        return sse(self._chunk_body(deltas)) if deltas else None

    def _finish(self, text: str, finish: str) -> tuple[str | None, list[dict] | None, str]:
        if self.tools is None:
            return text, None, finish
        content, calls, finish = self.tools.finish(text, finish)
        return content, tool_call_dicts(calls) or None, finish

    def _body(self, choices, usage):
        out = []
        for c in choices:
            content, calls, finish = self._finish("".join(c.text), c.finish_reason or "stop")
            out.append((chat_message(content or "", calls), finish, c.logprobs))
        return chat_response(self.rid, self.created, self.model_id, out, usage, self.tier)

    def _chunk_body(self, choices):
        return chat_chunk(self.rid, self.created, self.model_id, choices, self.tier)


class CompletionRenderer(Renderer):
    def __init__(self, rid: str, model_id: str, echo: str = ""):
        super().__init__(rid, model_id)
        self._echo = echo  # `echo`: the prompt's text, sent before each choice's own
        self._offsets: dict[int, int] = {}

    def response(self, outs, usage, n):
        body = super().response(outs, usage, n)
        for choice in body["choices"]:
            choice["text"] = self._echo + choice["text"]
        return body

    def chunk(self, out: EngineOutput) -> bytes | None:
        if not out.deltas:
            return None
        choices = []
        for d in out.deltas:
            off = self._offsets.get(d.index)
            if off is None and self._echo:
                d = replace(d, text=self._echo + d.text)
            choices.append(completion_delta(d, off or 0))
            self._offsets[d.index] = (off or 0) + len(d.text)
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
             session: str, billed_tier: str, renderer: Renderer, structured=None, returning: bool = False) -> Job:
        if req.n > self.config.ingress.max_n:
            raise bad_request(f"n is {req.n}; at most {self.config.ingress.max_n} choices per request",
                              param="n")
        if req.min_tokens > max_tokens:
            raise bad_request(f"min_tokens ({req.min_tokens}) exceeds the most this request may generate "
                              f"({max_tokens})", param="min_tokens")
        vocab = self.prompts[model.id].vocab_size()
        for param, ids in req.token_ids_named().items():
            if any(t >= vocab for t in ids):
                raise bad_request(f"{param} names token ids outside the vocabulary (ids are 0..{vocab - 1})",
                                  param=param)
        return Job(
            model=model,
            engine_request=EngineRequest(
                request_id=rid,
                prompt_token_ids=prompt_ids,
                sampling=req.sampling_params(max_tokens, structured),
                cache_salt=account,  # one prefix cache per account: no cross-account timing leaks
                use_cache=req.use_cache,
                priority=ENGINE_PRIORITY[billed_tier],
                returning=returning,
            ),
            session=session,
            stream=req.stream,
            include_usage=req.include_usage,
            perf_in_body=req.perf_metrics_in_response,
            billed_tier=billed_tier,
            renderer=renderer,
        )


# Bodies from this size are large: the ingress parses them on a worker thread, one at a time per
# account, counts their failures (ingress.failed_large_limit), and a chat body's messages are
# counted before it is validated.
LARGE_BODY_BYTES = 64 * 1024


class ChatServing(_Serving):
    def prepare(self, rid: str, account: str, body: bytes, headers) -> Job:
        if len(body) >= LARGE_BODY_BYTES:
            self._count_messages(account, body)
        return self.chat_job(rid, account, ChatCompletionRequest.model_validate_json(body), headers)

    def _count_messages(self, account: str, body: bytes) -> None:
        """Refuse a large body whose messages cannot fit its model's context, from a plain JSON
        parse: validating ~70k messages (a 2 MiB body) takes ~150 ms in pydantic-core, which holds
        the interpreter lock throughout and so stalls the event loop even from a worker thread;
        ``json.loads`` takes ~20 ms. Anything odd is left to the validation to report."""
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):  # not JSON, or nested too deep: validation says so
            return
        if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) \
                or not isinstance(obj.get("model"), str):
            return
        try:
            model = self._model_for(obj["model"], account)
        except Exception:  # an unknown model: validation first, as for any body
            return
        _check_message_count(len(obj["messages"]), model, "messages")

    def chat_job(self, rid: str, account: str, req: ChatCompletionRequest, headers, *, prefix: str = "chatcmpl-",
                 param: str = "messages", max_param: str | None = None, renderer=None) -> Job:
        """The Job of a chat request. The Responses API runs its requests through here too, with
        its own id prefix, parameter names and ``renderer(rid, model, tier, tools)``."""
        model = self._model_for(req.model, account)
        tier, billed_tier = _tier(req.service_tier, model)
        tools, structured = _tool_calling(req, model)
        _check_message_count(len(req.messages), model, param)
        try:
            prompt_ids = self.prompts[model.id].chat(
                req.messages, [t.model_dump(exclude_none=True) for t in req.tools or ()])
        except ValueError as exc:  # the template rejected the conversation
            raise bad_request(str(exc), param=param) from exc
        max_param = max_param or ("max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        max_tokens = self._max_tokens(model, len(prompt_ids), req.requested_max_tokens, max_param)
        session = session_key(account, header=headers.get(AFFINITY_HEADER),
                              prompt_cache_key=req.prompt_cache_key, user=req.user,
                              messages=((m.role, m.text) for m in req.messages))
        returning = continues_session(session, [m.role for m in req.messages])
        rid = prefix + rid
        made = (renderer(rid, model, tier, tools) if renderer is not None
                else ChatRenderer(rid, model.id, tier, tools))
        return self._job(rid, account, model, req, prompt_ids, max_tokens, session, billed_tier, made, structured,
                         returning)


def _check_message_count(count: int, model: ModelConfig, param: str) -> None:
    if count >= model.context_length:
        # Every message costs at least its role token: this cannot fit, so say so before the
        # (costly) rendering and tokenizing.
        raise bad_request(f"{count} messages cannot fit this model's context of {model.context_length} tokens",
                          param=param, code="context_length_exceeded")


def _tool_calling(req: ChatCompletionRequest, model: ModelConfig):
    """(how the output becomes tool calls, the constraint the tool choice adds), checked."""
    choice = req.tool_choice
    if not req.tools:
        if choice is not None and choice != "none":
            raise bad_request("tool_choice needs tools", param="tool_choice")
        return None, None
    if model.tool_call_parser is None:
        raise bad_request(f"{model.id} does not support function calling (no tool-call parser is "
                          "configured for it)", param="tools", code="tools_not_supported")
    names = [t.function.name for t in req.tools]
    if len(set(names)) != len(names):
        raise bad_request("tools holds two functions of one name", param="tools")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise bad_request(f"tool_choice names `{choice.function.name}`, which is not in tools",
                          param="tool_choice")
    if choice == "none":
        return None, None
    constraint = tool_constraint(req.tools, choice or "auto", req.parallel_tool_calls)
    if constraint is not None and req.response_format is not None and req.response_format.type != "text":
        raise bad_request("response_format cannot be combined with a required or named tool_choice",
                          param="response_format")
    mode = "named" if isinstance(choice, NamedToolChoice) else (choice or "auto")
    tools = ToolCalling(mode, TOOL_CALL_PARSERS[model.tool_call_parser], req.parallel_tool_calls,
                        choice.function.name if isinstance(choice, NamedToolChoice) else None)
    return tools, constraint


class CompletionServing(_Serving):
    def prepare(self, rid: str, account: str, body: bytes, headers) -> Job:
        req = CompletionRequest.model_validate_json(body)
        model = self._model_for(req.model, account)
        builder = self.prompts[model.id]
        if req.echo and req.logprobs is not None:
            # OpenAI would add the prompt's own logprobs, which Ember does not compute.
            raise bad_request("echo cannot be combined with logprobs", param="echo")
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
        echo = "" if not req.echo else req.prompt if isinstance(req.prompt, str) else builder.decode(prompt_ids)
        return self._job(rid, account, model, req, prompt_ids, max_tokens, session, "standard",
                         CompletionRenderer(rid, model.id, echo),
                         returning=continues_session(session))


def _tier(service_tier: str | None, model: ModelConfig) -> tuple[str | None, str]:
    """(the tier echoed in the response, the tier served and billed)."""
    if service_tier in (None, "auto", "default"):
        return ("default" if service_tier else None), "standard"
    if service_tier == "priority" and model.pricing.priority is not None:
        return "priority", "priority"
    offered = "default or priority" if model.pricing.priority is not None else "default"
    raise bad_request(f"service_tier '{service_tier}' is not available for {model.id}; it offers {offered}",
                      param="service_tier", code="unsupported_service_tier")

"""The Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``.

A response is a chat completion underneath: ``instructions`` become a system message, ``input``
(a string or message items) the conversation, and the chat path renders it (``ChatServing``'s
prompt builder, context checks and session key) and runs it through the same request lifecycle
(``Ingress.run_request``: admission, gate slot, dispatch, settlement exactly once).

``store`` (default true, as OpenAI) keeps the finished response, with its conversation, in the
configured store (``cluster.stores.ResponseStore``) for ``store.response_ttl_s``, under the
account that made it: ``previous_response_id`` continues that conversation, ``GET`` returns the
response and ``DELETE`` removes it, each for the owner only (any other account gets 404, as for an
id that never existed). ``instructions`` are not carried over to the next response, as in OpenAI.

Streams use OpenAI's event types with a ``sequence_number`` on every event: ``response.created``,
``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta``..., ``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done`` and ``response.completed`` (``response.incomplete`` when
``max_output_tokens`` cut the text short). There is no ``[DONE]`` line, as in OpenAI.

Function tools are not offered yet: ``tools`` answers 400 naming ``tools``.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, ClassVar, Literal, Union

from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cluster.stores import ResponseStore, StoreUnavailable
from deployments.engines.protocol import ChoiceDelta, EngineOutput, SamplingParams, Usage
from deployments.errors import bad_request, not_found, to_error
from deployments.lifecycle import LifeStream, RequestLife
from deployments.openai_api import INT64, Message, _Req, _require_strict_json
from deployments.serving import AFFINITY_HEADER, Job, Renderer, _Serving, _tier, dumps
from policies.affinity import session_key

log = logging.getLogger("ember.responses")


class InputText(_Req):
    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(_Req):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, list[InputText]]


class TextFormat(_Req):
    type: str = "text"


class TextConfig(_Req):
    format: TextFormat = TextFormat()


class ResponsesRequest(_Req):
    model: str = Field(min_length=1, max_length=512)
    input: Union[str, list[InputMessage]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = Field(None, max_length=128)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    text: TextConfig | None = None
    user: str | None = Field(None, max_length=512)
    prompt_cache_key: str | None = Field(None, max_length=512)
    service_tier: Literal["auto", "default", "priority", "flex", "scale", "fast"] | None = None
    metadata: dict[str, str] | None = None

    # What the chat path's Job building reads (deployments.serving._Serving._job).
    n: ClassVar[int] = 1
    include_usage: ClassVar[bool] = False
    perf_metrics_in_response: ClassVar[bool] = False
    use_cache: ClassVar[bool] = True

    @classmethod
    def model_validate_json(cls, json_data, *args, **kwargs):
        _require_strict_json(cls.__name__, json_data)
        return super().model_validate_json(json_data, *args, **kwargs)

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed)

    def messages(self) -> list[Message]:
        if isinstance(self.input, str):
            return [Message(role="user", content=self.input)]
        return [Message(role=m.role, content=m.content if isinstance(m.content, str)
                        else "".join(p.text for p in m.content)) for m in self.input]


# -- rendering --------------------------------------------------------------------------------


def response_usage(u: Usage) -> dict:
    # cache_write_tokens: 0, since Ember bills no cache writes (cached reads are cheaper, writes are not dearer).
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.total_tokens,
    }


class ResponsesRenderer(Renderer):
    """One response's body and events. ``rid`` is the response id (``resp_...``)."""

    def __init__(self, rid: str, model_id: str, req: ResponsesRequest, tier: str | None):
        super().__init__(rid, model_id)
        self.req = req
        self.tier = tier
        self.msg_id = "msg_" + rid[len("resp_"):]
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.seq = 0

    # -- whole ---------------------------------------------------------------------------------

    def add(self, out: EngineOutput) -> list[ChoiceDelta]:
        deltas = [d for d in out.deltas if d.index == 0]
        for d in deltas:
            self.text.append(d.text)
            self.finish_reason = d.finish_reason or self.finish_reason
        return deltas

    @property
    def incomplete(self) -> bool:
        return self.finish_reason == "length"

    def message(self, status: str) -> dict:
        content = [] if status == "in_progress" else [self.part()]
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant", "content": content}

    def part(self) -> dict:
        return {"type": "output_text", "text": "".join(self.text), "annotations": [], "logprobs": []}

    def body(self, status: str, usage: Usage | None) -> dict:
        done = status != "in_progress"
        body = {
            "id": self.rid,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": self.req.instructions,
            "max_output_tokens": self.req.max_output_tokens,
            "model": self.model_id,
            "output": [self.message("incomplete" if self.incomplete else "completed")] if done else [],
            "parallel_tool_calls": True,
            "previous_response_id": self.req.previous_response_id,
            "store": self.req.store,
            "temperature": self.req.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": self.req.top_p,
            "truncation": "disabled",
            "usage": response_usage(usage) if usage is not None else None,
            "user": self.req.user,
            "metadata": self.req.metadata or {},
        }
        if self.tier:
            body["service_tier"] = self.tier
        return body

    def response(self, outs: list[EngineOutput], usage: Usage, n: int) -> dict:
        for out in outs:
            self.add(out)
        return self.final(usage)

    def final(self, usage: Usage) -> dict:
        return self.body("incomplete" if self.incomplete else "completed", usage)

    # -- events --------------------------------------------------------------------------------

    def event(self, type_: str, **fields) -> bytes:
        data = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return b"event: " + type_.encode() + b"\ndata: " + dumps(data) + b"\n\n"

    def opening(self) -> list[bytes]:
        where = {"output_index": 0, "item_id": self.msg_id}
        return [
            self.event("response.created", response=self.body("in_progress", None)),
            self.event("response.in_progress", response=self.body("in_progress", None)),
            self.event("response.output_item.added", output_index=0, item=self.message("in_progress")),
            self.event("response.content_part.added", **where, content_index=0,
                       part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}),
        ]

    def chunk(self, out: EngineOutput) -> bytes | None:
        pieces = [d.text for d in self.add(out) if d.text]
        if not pieces:
            return None
        return self.event("response.output_text.delta", output_index=0, item_id=self.msg_id, content_index=0,
                          delta="".join(pieces), logprobs=[])

    def closing(self, final: dict) -> list[bytes]:
        where = {"output_index": 0, "item_id": self.msg_id}
        status = "incomplete" if self.incomplete else "completed"
        return [
            self.event("response.output_text.done", **where, content_index=0, text="".join(self.text), logprobs=[]),
            self.event("response.content_part.done", **where, content_index=0, part=self.part()),
            self.event("response.output_item.done", output_index=0, item=self.message(status)),
            self.event(f"response.{status}", response=final),
        ]

    def error_event(self, exc: BaseException) -> bytes:
        err = to_error(exc)
        return self.event("error", code=err.code, message=err.message, param=err.param)

    def conversation(self, history: list[dict]) -> list[dict]:
        """What a later ``previous_response_id`` continues: the turns so far and this answer."""
        turns = history + [{"role": m.role, "content": m.text} for m in self.req.messages()]
        return turns + [{"role": "assistant", "content": "".join(self.text)}]


# -- serving ----------------------------------------------------------------------------------


class ResponsesServing(_Serving):
    def prepare(self, rid: str, account: str, req: ResponsesRequest, history: list[dict], headers) -> Job:
        model = self._model_for(req.model, account)
        if req.tools:
            raise bad_request("function tools are not supported on /v1/responses yet; send the request "
                              "without `tools`", param="tools", code="unsupported_parameter")
        if req.text is not None and req.text.format.type != "text":
            raise bad_request(f"text.format `{req.text.format.type}` is not supported on /v1/responses; "
                              "only `text` is", param="text.format", code="unsupported_parameter")
        tier, billed_tier = _tier(req.service_tier, model)
        messages = [Message(role=t["role"], content=t["content"]) for t in history] + req.messages()
        if req.instructions:
            messages.insert(0, Message(role="system", content=req.instructions))
        if len(messages) >= model.context_length:
            raise bad_request(f"{len(messages)} messages cannot fit this model's context of "
                              f"{model.context_length} tokens", param="input", code="context_length_exceeded")
        try:
            prompt_ids = self.prompts[model.id].chat(messages)
        except ValueError as exc:  # the template rejected the conversation
            raise bad_request(str(exc), param="input") from exc
        max_tokens = self._max_tokens(model, len(prompt_ids), req.max_output_tokens, "max_output_tokens")
        session = session_key(account, header=headers.get(AFFINITY_HEADER), prompt_cache_key=req.prompt_cache_key,
                              user=req.user, messages=((m.role, m.text) for m in messages))
        rid = "resp_" + rid
        return self._job(rid, account, model, req, prompt_ids, max_tokens, session, billed_tier,
                         ResponsesRenderer(rid, model.id, req, tier))


class ResponsesApi:
    """The three routes. ``ingress`` runs the lifecycle (``Ingress.run_request``)."""

    def __init__(self, ingress, serving: ResponsesServing, store: ResponseStore, ttl_s: float):
        self.ingress = ingress
        self.serving = serving
        self.store = store
        self.ttl_s = ttl_s

    async def create(self, request: Request, rid: str) -> Response:
        history: list[dict] = []

        async def prepare(account: str, body: bytes, headers) -> Job:
            req = ResponsesRequest.model_validate_json(body)
            if req.previous_response_id:
                record = await self._load(account, req.previous_response_id, param="previous_response_id")
                history.extend(record["conversation"])
            return self.serving.prepare(rid, account, req, history, headers)

        life, first, headers = await self.ingress.run_request(request, prepare)
        if life.job.stream:
            return LifeStream(life, self._events(life, first, history), headers)
        try:
            outs = [out async for out in life.outputs(first)]
        except BaseException:
            life.settle()
            raise
        life.settle()
        renderer: ResponsesRenderer = life.job.renderer
        body = renderer.response(outs, life.usage, 1)
        await self._save(life, renderer, body, history)
        return Response(dumps(body), media_type="application/json", headers=headers)

    async def _events(self, life: RequestLife, first: EngineOutput, history: list[dict]) -> AsyncIterator[bytes]:
        renderer: ResponsesRenderer = life.job.renderer
        try:
            for event in renderer.opening():
                yield event
            async for out in life.outputs(first):
                event = renderer.chunk(out)
                if event is not None:
                    yield event
            life.settle()
            final = renderer.final(life.usage)
            await self._save(life, renderer, final, history)
            for event in renderer.closing(final):
                yield event
        except Exception as exc:  # cancellation (the client left) passes through untouched
            yield renderer.error_event(exc)
        finally:
            life.settle()

    async def _save(self, life: RequestLife, renderer: ResponsesRenderer, body: dict, history: list[dict]) -> None:
        if not renderer.req.store:
            return
        record = {"response": body, "conversation": renderer.conversation(history)}
        try:
            await self.store.put(life.account, renderer.rid, record, self.ttl_s)
        except StoreUnavailable:
            # The answer exists and is billed; only its stored copy is missing.
            log.warning("could not store response %s", renderer.rid, exc_info=True)

    async def _load(self, account: str, response_id: str, param: str | None = None) -> dict:
        record = await self.store.get(account, response_id)
        if record is None:  # another account's response is not there, as far as callers can tell
            raise not_found(f"response `{response_id}` not found", param=param, code="response_not_found")
        return record

    async def retrieve(self, request: Request, response_id: str) -> Response:
        account = await self.ingress.auth.account(request)
        record = await self._load(account, response_id)
        return JSONResponse(record["response"])

    async def delete(self, request: Request, response_id: str) -> Response:
        account = await self.ingress.auth.account(request)
        if not await self.store.delete(account, response_id):
            raise not_found(f"response `{response_id}` not found", code="response_not_found")
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})


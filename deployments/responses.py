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

Function tools (``tools``, ``tool_choice``, ``parallel_tool_calls``) go to the chat path's tool
calling: a model without a tool-call parser answers 400 naming ``tools``; the calls come out as
``function_call`` items, and ``function_call`` / ``function_call_output`` input items go back in
as the assistant's tool calls and ``tool`` messages. With tools, text streams as it comes until
a call may begin (the chat path's ``ToolStream``); the calls are sent whole at the end of the
stream (``response.function_call_arguments.delta`` / ``.done`` for each call).
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Literal, Union

from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cluster.stores import ResponseStore, StoreUnavailable
from deployments.engines.protocol import ChoiceDelta, EngineOutput, Usage
from deployments.errors import bad_request, not_found, to_error
from deployments.lifecycle import LifeStream, RequestLife
from deployments.openai_api import FUNCTION_NAME, INT64, ChatCompletionRequest, _Body, _Req
from deployments.serving import ChatServing, Job, Renderer, dumps
from deployments.tool_calls import ToolCalling, ToolStream

log = logging.getLogger("ember.responses")


class InputText(_Req):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # on output_text replayed from an earlier response
    logprobs: list[Any] | None = None


class InputMessage(_Req):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, list[InputText]]
    id: str | None = None  # an output message replayed as input
    status: str | None = None

    def chat(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class FunctionCallItem(_Req):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str
    id: str | None = None
    status: str | None = None

    def chat(self) -> dict:
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}]}


class FunctionCallOutputItem(_Req):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str
    id: str | None = None
    status: str | None = None

    def chat(self) -> dict:
        return {"role": "tool", "tool_call_id": self.call_id, "content": self.output}


# Message items may omit "type" (OpenAI's easy input message), so no discriminator: the union
# tells them apart by their required fields.
InputItem = Union[InputMessage, FunctionCallItem, FunctionCallOutputItem]


class FunctionTool(_Req):
    """A Responses function tool: the chat path's ``{"type": "function", "function": {...}}``,
    flattened."""

    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def chat(self) -> dict:
        return {"type": "function", "function": self.model_dump(exclude={"type"}, exclude_none=True)}


class NamedFunctionChoice(_Req):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)


class TextFormat(_Req):
    type: str = "text"


class TextConfig(_Req):
    format: TextFormat = TextFormat()


class ResponsesRequest(_Body):
    model: str = Field(min_length=1, max_length=512)
    input: Union[str, list[InputItem]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = Field(None, max_length=128)
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Union[Literal["none", "auto", "required"], NamedFunctionChoice, None] = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    user: str | None = Field(None, max_length=512)
    prompt_cache_key: str | None = Field(None, max_length=512)
    service_tier: Literal["auto", "default", "priority", "flex", "scale", "fast"] | None = None
    metadata: dict[str, str] | None = None

    def turns(self) -> list[dict]:
        """This request's input as chat messages (without the instructions)."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        return [item.chat() for item in self.input]

    def to_chat(self, history: list[dict]) -> ChatCompletionRequest:
        """The chat completion this response runs as: instructions, the stored conversation of
        ``previous_response_id`` (``history``) and this input, with the same sampling and tools."""
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        choice = self.tool_choice
        if isinstance(choice, NamedFunctionChoice):
            choice = {"type": "function", "function": {"name": choice.name}}
        body = {
            "model": self.model, "messages": system + history + self.turns(), "stream": self.stream,
            "max_completion_tokens": self.max_output_tokens, "temperature": self.temperature,
            "top_p": self.top_p, "seed": self.seed, "user": self.user, "prompt_cache_key": self.prompt_cache_key,
            "service_tier": self.service_tier, "tool_choice": choice, "parallel_tool_calls": self.parallel_tool_calls,
            "tools": [t.chat() for t in self.tools] if self.tools else None,
        }
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})


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
    """One response's body and events. ``rid`` is the response id (``resp_...``).

    The text streams as it comes, in one message item. With tools it streams as the chat path's
    ``ToolStream`` lets it (``auto``: until a ``<tool_call>`` may begin), the message item opened
    with its first text; the calls are known only when the text is whole
    (``ToolCalling.extract``), so each ``function_call`` item, and the rest of the text if the
    stream held some back, is sent at the end.
    """

    def __init__(self, rid: str, model_id: str, req: ResponsesRequest, tier: str | None,
                 tools: ToolCalling | None = None):
        super().__init__(rid, model_id)
        self.req = req
        self.tier = tier
        self.tools = tools
        self.msg_id = "msg_" + rid[len("resp_"):]
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.seq = 0
        self._split: tuple[str | None, list[tuple[str, str]]] | None = None
        self._stream = ToolStream(tools) if tools is not None else None
        self._opened = False  # the message item's opening events went out
        self._streamed = 0  # characters of the message's text sent as deltas

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

    def split(self) -> tuple[str | None, list[tuple[str, str]]]:
        """(the text content, the calls as (name, arguments)), once the text is whole."""
        if self._split is None:
            text = "".join(self.text)
            self._split = self.tools.extract(text) if self.tools is not None else (text, [])
        return self._split

    def part(self, text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def message(self, status: str, text: str | None) -> dict:
        content = [] if text is None else [self.part(text)]
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant", "content": content}

    def call(self, i: int, name: str, arguments: str, status: str = "completed") -> dict:
        suffix = self.rid[len("resp_"):]
        return {"type": "function_call", "id": f"fc_{suffix}_{i}", "call_id": f"call_{suffix}_{i}",
                "name": name, "arguments": arguments, "status": status}

    def output(self) -> list[dict]:
        content, calls = self.split()
        status = "incomplete" if self.incomplete else "completed"
        items = [self.message(status, content or "")] if content or not calls else []
        return items + [self.call(i, name, args) for i, (name, args) in enumerate(calls)]

    def body(self, status: str, usage: Usage | None) -> dict:
        req = self.req
        body = {
            "id": self.rid,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.model_id,
            "output": self.output() if status != "in_progress" else [],
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "store": req.store,
            "temperature": req.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": (req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedFunctionChoice)
                            else req.tool_choice or "auto"),
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or ()],
            "top_p": req.top_p,
            "truncation": "disabled",
            "usage": response_usage(usage) if usage is not None else None,
            "user": req.user,
            "metadata": req.metadata or {},
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

    def _message_start(self) -> list[bytes]:
        self._opened = True
        return [self.event("response.output_item.added", output_index=0, item=self.message("in_progress", None)),
                self.event("response.content_part.added", output_index=0, item_id=self.msg_id, content_index=0,
                           part=self.part(""))]

    def opening(self) -> list[bytes]:
        events = [self.event("response.created", response=self.body("in_progress", None)),
                  self.event("response.in_progress", response=self.body("in_progress", None))]
        return events if self.tools is not None else events + self._message_start()

    def chunk(self, out: EngineOutput) -> bytes | None:
        deltas = self.add(out)
        if self._stream is None:
            text = "".join(d.text for d in deltas)
        else:  # only text the choice's end cannot turn into a call; calls wait for closing()
            text = "".join(self._stream.feed(d.text, None)[0] or "" for d in deltas if d.text)
        if not text:
            return None
        events = [] if self._opened else self._message_start()
        events.append(self._text_delta(0, text))
        return b"".join(events)

    def _text_delta(self, index: int, text: str) -> bytes:
        self._streamed += len(text)
        return self.event("response.output_text.delta", output_index=index, item_id=self.msg_id,
                          content_index=0, delta=text, logprobs=[])

    def closing(self, final: dict) -> list[bytes]:
        events: list[bytes] = []
        for index, item in enumerate(final["output"]):
            if item["type"] == "message":
                text = item["content"][0]["text"]
                where = {"output_index": index, "item_id": item["id"]}
                if not self._opened:
                    events += self._message_start()
                if len(text) > self._streamed:  # what a stream with tools held back
                    events.append(self._text_delta(index, text[self._streamed:]))
                events += [
                    self.event("response.output_text.done", **where, content_index=0, text=text, logprobs=[]),
                    self.event("response.content_part.done", **where, content_index=0, part=self.part(text)),
                ]
            else:
                where = {"output_index": index, "item_id": item["id"]}
                events += [
                    self.event("response.output_item.added", output_index=index,
                               item={**item, "arguments": "", "status": "in_progress"}),
                    self.event("response.function_call_arguments.delta", **where, delta=item["arguments"]),
                    self.event("response.function_call_arguments.done", **where, name=item["name"],
                               arguments=item["arguments"]),
                ]
            events.append(self.event("response.output_item.done", output_index=index, item=item))
        return events + [self.event(f"response.{final['status']}", response=final)]

    def error_event(self, exc: BaseException) -> bytes:
        err = to_error(exc)
        return self.event("error", code=err.code, message=err.message, param=err.param)

    def conversation(self, history: list[dict]) -> list[dict]:
        """What a later ``previous_response_id`` continues: the turns so far and this answer."""
        content, calls = self.split()
        answer: dict = {"role": "assistant", "content": content or None}
        if calls:
            answer["tool_calls"] = [{"id": c["call_id"], "type": "function",
                                     "function": {"name": c["name"], "arguments": c["arguments"]}}
                                    for c in self.output() if c["type"] == "function_call"]
        elif not content:
            answer["content"] = ""
        return history + self.req.turns() + [answer]


# -- serving ----------------------------------------------------------------------------------


class ResponsesServing(ChatServing):
    """Runs a response as the chat completion ``ResponsesRequest.to_chat`` makes of it, through
    the chat path's checks (tools, tiers, context), prompt rendering and job building."""

    def prepare_response(self, rid: str, account: str, req: ResponsesRequest, history: list[dict], headers) -> Job:
        if req.text is not None and req.text.format.type != "text":
            raise bad_request(f"text.format `{req.text.format.type}` is not supported on /v1/responses; "
                              "only `text` is", param="text.format", code="unsupported_parameter")
        return self.chat_job(rid, account, req.to_chat(history), headers, prefix="resp_", param="input",
                             max_param="max_output_tokens",
                             renderer=lambda rid, model, tier, tools: ResponsesRenderer(rid, model.id, req, tier, tools))


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
            return self.serving.prepare_response(rid, account, req, history, headers)

        life, first, headers = await self.ingress.run_request(request, prepare)
        if life.job.stream:
            return LifeStream(life, self._events(life, first, history), headers)
        try:
            outs = [out async for out in life.outputs(first)]
        except BaseException as exc:
            life.outcome = exc
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
            life.outcome = exc
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


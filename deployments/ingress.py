"""The OpenAI-compatible ingress: auth → validate → tokenize → dispatch to a model pool → respond.

The data path is proxy → ingress → pool replica and nothing more: the ingress holds one
``DeploymentHandle`` per model pool and calls it directly. Errors leave through
``deployments.errors`` only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from cluster.config import EmberConfig, ModelConfig
from cluster.stores import Stores, StoreUnavailable, hash_key, key_id
from deployments.engines.protocol import EngineMetrics, EngineOutput, EngineRequest, Usage
from deployments.errors import ApiError, bad_request, error_response, error_sse_event, not_found, unauthorized
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
    perf_headers,
    perf_metrics,
    usage_dict,
)
from deployments.admin import AdminApi
from deployments.billing import Billing
from deployments.pool_gate import PoolGate, ReleaseSlot
from deployments.prompts import PromptBuilder
from deployments.rate_limiter import ACTOR_NAMESPACE, Admission, LimiterClient, RateLimiter, rate_limit_headers
from policies.affinity import session_key
from policies.consistent_hash import stable_hash
from policies.tiers import ENGINE_PRIORITY

log = logging.getLogger("ember.ingress")

API_PREFIXES = ("/v1/", "/inference/v1/")
AFFINITY_HEADER = "x-session-affinity"
REPLICA_HEADER = "x-ember-replica"  # which pool replica served a request: for operators and benchmarks
REPLICA_SPAN_HEADER = "x-ember-replica-span"  # "start,end": when that replica held it (Unix seconds)
SPEND_WARNING_HEADER = "x-ember-spend-warning"
KEY_CACHE_TTL_S = 30.0  # how long a revoked key may still work on a replica that saw it
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def lifecycle_headers(model: ModelConfig) -> dict[str, str]:
    """RFC 9745 `Deprecation` and RFC 8594 `Sunset` for a deprecated model."""
    lc = model.lifecycle
    if lc.status != "deprecated" or lc.deprecated_on is None or lc.removal_date is None:
        return {}
    import calendar
    from email.utils import formatdate

    noticed = calendar.timegm(lc.deprecated_on.timetuple())
    sunset = calendar.timegm(lc.removal_date.timetuple())
    h = {"Deprecation": f"@{noticed}", "Sunset": formatdate(sunset, usegmt=True)}
    if lc.replacement:
        h["Link"] = f'<{lc.replacement}>; rel="successor-version"'
    return h


@dataclass
class _Call:
    """What one API call carries between the steps of its handler."""

    request_id: str
    account: str
    started: float
    model: ModelConfig
    engine_request: EngineRequest
    created: int
    stream: bool
    include_usage: bool
    perf_in_body: bool
    tier: str | None  # what the response echoes as service_tier (None: the caller did not ask)
    session: str
    billed_tier: str = "standard"  # priority | standard | batch
    admission: Admission | None = None
    billed: bool = False


class Ingress:
    def __init__(self, config: EmberConfig | dict, pools: dict[str, Any], demo_key_hash: str | None = None,
                 admin_token_hash: str | None = None):
        self.config = config if isinstance(config, EmberConfig) else EmberConfig.model_validate(config)
        self.pools = pools
        self.stores = Stores(self.config.store.url)
        self.keys = self.stores.keys
        self.billing = Billing(self.stores, self.config.rate_limit.default_spend_tier,
                               fail_open=self.config.rate_limit.on_store_error == "open")
        self.admin = AdminApi(self.stores, self.billing, admin_token_hash, self._forget_key)
        self._loads = {m.id: PoolGate(m, self.config) for m in self.config.models if m.served}
        self._demo_key_hash = demo_key_hash
        self._seeded = False
        self._key_cache: dict[str, tuple[str, float]] = {}
        self._prompts = {m.id: PromptBuilder(m.model_dir) for m in self.config.models if m.served}
        self._created = int(time.time())
        rl = self.config.rate_limit
        self.limiter = LimiterClient(rl, self._limiter_actor) if rl.enabled else None
        self._limiter_actors: dict[int, Any] = {}
        self._routes: dict[tuple[str, str], Callable[[Request, str], Awaitable[Response]]] = {
            ("POST", "chat/completions"): self.chat_completions,
            ("POST", "completions"): self.completions,
            ("GET", "models"): self.list_models,
            ("GET", "usage"): self.usage,
        }

    def _limiter_actor(self, shard: int):
        actor = self._limiter_actors.get(shard)
        if actor is None:
            import ray

            # Detached and restartable: it outlives any one ingress replica and, restarted,
            # reloads its state from the store.
            # Apps with different limiter settings or stores get different actors.
            digest = stable_hash(self.config.rate_limit.model_dump_json() + self.config.store.url)
            actor = ray.remote(RateLimiter).options(
                name=f"ember-ratelimit-{digest:016x}-{shard}", namespace=ACTOR_NAMESPACE, get_if_exists=True,
                lifetime="detached", max_restarts=-1, max_task_retries=-1, num_cpus=0,
            ).remote(self.config.rate_limit, self.config.store.url)
            self._limiter_actors[shard] = actor
        return actor

    def _forget_key(self, kid: str) -> None:
        for digest in [d for d in self._key_cache if key_id(d) == kid]:
            del self._key_cache[digest]

    async def __del__(self):
        if self.limiter is not None:
            await self.limiter.close()
        await self.billing.flush(timeout_s=5.0)

    # -- entry point --------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        # Serve's proxy sets `x-request-id` on every response (the caller's own, if it sent one);
        # `rid` names the completion and the engine request, and must be unique.
        rid = uuid.uuid4().hex
        try:
            handler = self._route(request)
            return await handler(request, rid)
        except Exception as exc:  # the one conversion point
            return error_response(exc)

    def _route(self, request: Request) -> Callable[[Request, str], Awaitable[Response]]:
        # Under a Serve route prefix other than "/", the scope's root_path holds that prefix.
        path = request.scope["path"]
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if path.startswith("/admin/"):
            return lambda req, rid: self.admin.handle(req, path[len("/admin/"):])
        for prefix in API_PREFIXES:
            if path.startswith(prefix):
                tail = path[len(prefix):].rstrip("/")
                handler = self._routes.get((request.method, tail))
                if handler is not None:
                    return handler
                if request.method == "GET" and tail.startswith("accounts/"):
                    return lambda req, rid: self.account_info(req, tail[len("accounts/"):])
                if any(t == tail for _, t in self._routes):
                    raise ApiError(405, f"method {request.method} is not allowed on {path}",
                                   code="method_not_allowed")
                break
        raise not_found(f"no route for {request.method} {path}", code="unknown_url")

    # -- shared steps -------------------------------------------------------------------

    async def _authenticate(self, request: Request) -> str:
        if not self._seeded:
            self._seeded = True
            if self._demo_key_hash:
                self._key_cache[self._demo_key_hash] = (self.config.auth.demo_account, math.inf)
                try:
                    await self.keys.put(self._demo_key_hash, self.config.auth.demo_account)
                except StoreUnavailable:
                    log.warning("could not store the demo key; it works on this replica only")
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        digest = hash_key(key.strip())
        now = time.monotonic()
        hit = self._key_cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        account = await self.keys.account_for(digest)
        if account is None:
            raise unauthorized("invalid API key")
        # Known keys are remembered briefly, so the store is not on every request's path.
        self._key_cache[digest] = (account, now + KEY_CACHE_TTL_S)
        return account

    async def _body(self, request: Request) -> bytes:
        limit = self.config.ingress.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def _model(self, model_id: str) -> ModelConfig:
        model = self.config.model(model_id)
        if model is None:
            raise not_found(f"the model `{model_id}` does not exist or you do not have access to it",
                            param="model", code="model_not_found")
        lc = model.lifecycle
        if lc.status == "removed":
            instead = f"; use `{lc.replacement}` instead" if lc.replacement else ""
            raise not_found(f"the model `{model_id}` was removed on {lc.removal_date}{instead}",
                            param="model", code="model_removed")
        return model

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

    def _call(self, rid: str, account: str, started: float, model: ModelConfig, req, prompt_ids: list[int],
              max_tokens: int, tier: str | None, session: str) -> _Call:
        if req.n > self.config.ingress.max_n:
            raise bad_request(f"n is {req.n}; at most {self.config.ingress.max_n} choices per request",
                              param="n")
        return _Call(
            request_id=rid,
            account=account,
            started=started,
            model=model,
            engine_request=EngineRequest(
                request_id=rid,
                prompt_token_ids=prompt_ids,
                sampling=req.sampling_params(max_tokens),
                cache_salt=account,  # one prefix cache per account: no cross-account timing leaks
                use_cache=req.use_cache,
            ),
            created=int(time.time()),
            stream=req.stream,
            include_usage=req.include_usage,
            perf_in_body=req.perf_metrics_in_response,
            tier=tier,
            session=session,
        )

    def _server_metrics(self, call: _Call, out: EngineOutput, dispatched: float) -> EngineMetrics:
        # Server time counts from the ingress receiving the request: time spent here before
        # dispatch plus what the engine measured.
        m = out.metrics or EngineMetrics(0.0, 0.0)
        before = dispatched - call.started
        return EngineMetrics(before + m.time_to_first_token_s, time.perf_counter() - call.started)

    # -- endpoints ----------------------------------------------------------------------

    async def list_models(self, request: Request, rid: str) -> Response:
        await self._authenticate(request)
        data = []
        for m in self.config.models:
            if not m.served:
                continue
            lc = m.lifecycle
            data.append({
                "id": m.id,
                "object": "model",
                "created": self._created,
                "owned_by": m.owner,
                "context_length": m.context_length,
                "kind": "fast" if "/routers/" in m.id else "base",
                "status": lc.status,
                "deprecation_date": lc.deprecated_on.isoformat() if lc.deprecated_on else None,
                "shutdown_date": lc.removal_date.isoformat() if lc.removal_date else None,
                "replacement": lc.replacement,
                "service_tiers": ["default", "priority"] if m.pricing.priority else ["default"],
            })
        return JSONResponse({"object": "list", "data": data})

    async def chat_completions(self, request: Request, rid: str) -> Response:
        started = time.perf_counter()
        account = await self._authenticate(request)
        req = ChatCompletionRequest.model_validate_json(await self._body(request))
        model = self._model(req.model)
        tier, billed_tier = self._tier(req.service_tier, model)
        try:
            prompt_ids = self._prompts[model.id].chat(req.messages)
        except ValueError as exc:  # the template rejected the conversation
            raise bad_request(str(exc), param="messages") from exc
        max_tokens = self._max_tokens(model, len(prompt_ids), req.requested_max_tokens,
                                      "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        session = session_key(account, header=request.headers.get(AFFINITY_HEADER),
                              prompt_cache_key=req.prompt_cache_key, user=req.user,
                              messages=((m.role, m.text) for m in req.messages))
        call = self._call("chatcmpl-" + rid, account, started, model, req, prompt_ids, max_tokens, tier, session)
        call.billed_tier = billed_tier
        call.engine_request.priority = ENGINE_PRIORITY[billed_tier]
        return await self._respond(call, rid, chat=True)

    async def completions(self, request: Request, rid: str) -> Response:
        started = time.perf_counter()
        account = await self._authenticate(request)
        req = CompletionRequest.model_validate_json(await self._body(request))
        model = self._model(req.model)
        builder = self._prompts[model.id]
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
        session = session_key(account, header=request.headers.get(AFFINITY_HEADER),
                              prompt_cache_key=req.prompt_cache_key, user=req.user, prompt_ids=prompt_ids)
        call = self._call("cmpl-" + rid, account, started, model, req, prompt_ids, max_tokens, None, session)
        return await self._respond(call, rid, chat=False)

    def _tier(self, service_tier: str | None, model: ModelConfig) -> tuple[str | None, str]:
        """(the tier echoed in the response, the tier served and billed)."""
        if service_tier in (None, "auto", "default"):
            return ("default" if service_tier else None), "standard"
        if service_tier == "priority" and model.pricing.priority is not None:
            return "priority", "priority"
        offered = "default or priority" if model.pricing.priority is not None else "default"
        raise bad_request(f"service_tier '{service_tier}' is not available for {model.id}; it offers {offered}",
                          param="service_tier", code="unsupported_service_tier")

    async def usage(self, request: Request, rid: str) -> Response:
        """The caller's own usage and cost, by model and day."""
        account = await self._authenticate(request)
        await self.billing.flush(timeout_s=2.0)  # this replica's own pending writes first
        rows = await self.stores.ledger.totals(account)
        self.billing.forget(account)
        acct = await self.billing.account(account)
        return JSONResponse({
            "object": "usage",
            "account": account,
            "spend_tier": acct.spend_tier,
            "total_cost_usd": round(acct.total_usd, 6),
            "month_cost_usd": round(acct.month_usd, 6),
            "monthly_spend_limit_usd": acct.monthly_limit_usd,
            "data": [{**r, "cost_usd": round(r["cost_usd"], 8)} for r in rows],
        })

    async def account_info(self, request: Request, account_id: str) -> Response:
        account = await self._authenticate(request)
        if account_id != account:  # another account's data does not exist, as far as callers can tell
            raise not_found(f"account `{account_id}` not found", param="account", code="account_not_found")
        acct = await self.billing.account(account)
        return JSONResponse({"object": "account", "id": account, "spend_tier": acct.spend_tier,
                             "monthly_spend_limit_usd": acct.monthly_limit_usd,
                             "month_cost_usd": round(acct.month_usd, 6)})

    # -- dispatch -----------------------------------------------------------------------

    async def _admit(self, call: _Call) -> dict[str, str]:
        """Spend limit (402) and rate limits (429), decided at once, never queued.

        Returns the headers every response carries: rate limits, lifecycle, spend warnings.
        """
        headers = lifecycle_headers(call.model)
        acct = await self.billing.account(call.account)
        if acct.status == "stop":
            raise ApiError(402, f"the monthly spend limit of ${acct.monthly_limit_usd:.2f} is reached "
                                f"(${acct.month_usd:.2f} spent this month); raise it to continue",
                           type="billing_error", code="spend_limit_reached")
        if acct.status == "warn":
            headers[SPEND_WARNING_HEADER] = (f"{acct.month_usd / acct.monthly_limit_usd:.0%} of the monthly "
                                             f"spend limit of ${acct.monthly_limit_usd:.2f} is used")
        if self.limiter is None:
            return headers
        sp = call.engine_request.sampling
        cost = self.limiter.reservation(len(call.engine_request.prompt_token_ids), sp.max_tokens, sp.n)
        adm = await self.limiter.admit(call.account, call.model, acct.spend_tier, cost)
        headers.update(rate_limit_headers(adm, self.config.rate_limit.requests_per_minute))
        if not adm.allowed:
            what = {"requests": "requests per minute", "prompt": "prompt tokens per minute",
                    "uncached": "uncached (cache-adjusted) prompt tokens per minute",
                    "generated": "generated tokens per minute"}.get(adm.exhausted or "", adm.exhausted)
            raise ApiError(429, f"rate limit exceeded for {call.model.id}: {what}; retry after "
                                f"{adm.retry_after_s:.3f} s", type="rate_limit_error",
                           code="rate_limit_exceeded", param=adm.exhausted,
                           headers={**headers, "Retry-After": str(max(1, math.ceil(adm.retry_after_s)))})
        call.admission = adm
        return headers

    def _settle(self, call: _Call, usage: Usage | None, generated_so_far: int = 0) -> None:
        """Settle rate limits and bill, exactly once per call.

        ``usage`` None means the stream was cut short after it started: the prompt was processed
        and the output counts as far as it got.
        """
        if usage is None:
            usage = Usage(len(call.engine_request.prompt_token_ids), generated_so_far, 0)
        if self.limiter is not None and call.admission is not None:
            self.limiter.settle(call.admission, usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)
            call.admission = None
        if not call.billed and (usage.prompt_tokens or usage.completion_tokens):
            call.billed = True
            self.billing.bill(call.request_id, call.account, call.model, call.billed_tier, usage.prompt_tokens,
                              usage.cached_tokens, usage.completion_tokens)

    async def _respond(self, call: _Call, rid: str, chat: bool) -> Response:
        headers = await self._admit(call)
        load = self._loads[call.model.id]
        try:
            await load.acquire(call.billed_tier, call.model.id)
        except BaseException:
            self._settle(call, Usage(0, 0, 0))
            raise
        try:
            response = await self._dispatch(call, chat, headers)
        except BaseException:
            load.release()
            self._settle(call, Usage(0, 0, 0))  # nothing was served: give the whole reservation back
            raise
        if isinstance(response, StreamingResponse):
            response.background = ReleaseSlot(load)  # the stream still runs: hold the slot until it ends
        else:
            load.release()
        return response

    async def _dispatch(self, call: _Call, chat: bool, headers: dict[str, str]) -> Response:
        # The proxy attaches a session id only on its own hop; this hop needs it set again.
        pool = self.pools[call.model.id].options(session_id=call.session)
        timeout = self.config.ingress.request_timeout_s
        if not call.stream:
            dispatched = time.perf_counter()
            async with asyncio.timeout(timeout):
                out: EngineOutput = await pool.generate.remote(call.engine_request)
            assert out.usage is not None, "engine ended without usage"
            self._settle(call, out.usage)
            metrics = self._server_metrics(call, out, dispatched)
            if out.metrics is not None:
                self._loads[call.model.id].observe(out.metrics.processing_time_s)
            choices = [ChoiceAccumulator() for _ in range(call.engine_request.sampling.n)]
            for d in out.deltas:
                choices[d.index].add(d)
            if chat:
                body = chat_response(call.request_id, call.created, call.model.id, choices, out.usage, call.tier)
            else:
                body = completion_response(call.request_id, call.created, call.model.id, choices, out.usage)
            if call.perf_in_body:
                body["perf_metrics"] = perf_metrics(out.usage, metrics)
            headers.update(perf_headers(out.usage, metrics))
            if out.replica:
                headers[REPLICA_HEADER] = out.replica
            if out.replica_span:
                headers[REPLICA_SPAN_HEADER] = "{:.6f},{:.6f}".format(*out.replica_span)
            return Response(_dumps(body), media_type="application/json", headers=headers)

        dispatched = time.perf_counter()
        gen = pool.options(stream=True).generate_stream.remote(call.engine_request)
        try:
            # Wait for the first output before answering, so that a failure to start (overload,
            # a rejected prompt) still gets its proper status code instead of a broken stream.
            async with asyncio.timeout(timeout):
                first = await gen.__anext__()
        except BaseException:
            gen.cancel()
            raise
        return StreamingResponse(self._sse(call, first, gen, dispatched, chat),
                                 media_type="text/event-stream", headers={**headers, **SSE_HEADERS})

    async def _sse(self, call: _Call, first: EngineOutput, gen, dispatched: float,
                   chat: bool) -> AsyncIterator[bytes]:
        rid, created, model_id = call.request_id, call.created, call.model.id
        started_choices: set[int] = set()
        offsets: dict[int, int] = {}
        usage: Usage | None = None
        generated = 0
        out: EngineOutput | None = first
        try:
            while out is not None:
                generated += sum(len(d.token_ids) for d in out.deltas)
                if out.deltas:
                    if chat:
                        deltas = []
                        for d in out.deltas:
                            deltas.append(chat_delta(d, d.index not in started_choices))
                            started_choices.add(d.index)
                        yield _sse(chat_chunk(rid, created, model_id, deltas, call.tier))
                    else:
                        choices = []
                        for d in out.deltas:
                            off = offsets.get(d.index, 0)
                            choices.append(completion_delta(d, off))
                            offsets[d.index] = off + len(d.text)
                        yield _sse(completion_chunk(rid, created, model_id, choices))
                if out.final:
                    usage = out.usage
                    final_out = out
                    if out.metrics is not None:
                        self._loads[call.model.id].observe(out.metrics.processing_time_s)
                    break
                out = await gen.__anext__()
            if usage is not None and (call.include_usage or call.perf_in_body):
                tail: dict = (chat_chunk(rid, created, model_id, [], call.tier) if chat
                              else completion_chunk(rid, created, model_id, []))
                if call.include_usage:
                    tail["usage"] = usage_dict(usage)
                if call.perf_in_body:
                    tail["perf_metrics"] = perf_metrics(usage, self._server_metrics(call, final_out, dispatched))
                yield _sse(tail)
            yield b"data: [DONE]\n\n"
        except StopAsyncIteration:
            yield error_sse_event(ApiError(503, "the model stream ended early; retry the request",
                                           type="service_unavailable", code="stream_interrupted"))
        except Exception as exc:
            yield error_sse_event(exc)
        finally:
            self._settle(call, usage, generated)
            if usage is None:
                gen.cancel()  # the client went away or the stream failed: stop generating

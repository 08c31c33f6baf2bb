"""The OpenAI-compatible ingress: the HTTP shell in front of the model pools.

It routes, authenticates, reads the body within its limit, and hands generation to an endpoint's
serving class (``deployments.serving``: parse and render) and to the request's lifecycle
(``deployments.lifecycle``: admission, slot, replica stream, settlement). The data path is proxy →
ingress → pool replica and nothing more: the ingress holds one ``DeploymentHandle`` per model pool
and calls it directly. Errors leave through ``deployments.errors`` only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cluster.blobs import BlobStore
from cluster.config import EmberConfig, ModelConfig
from cluster.stores import Stores
from deployments.admin import AdminApi
from deployments.auth import FailureThrottle, KeyAuth
from deployments.batch_api import BatchApi
from deployments.billing import Billing, outbox_path
from deployments.embeddings import EmbeddingServing
from deployments.errors import (
    ApiError,
    bad_request,
    error_response,
    error_sse_event,
    not_found,
    to_error,
    too_many_failed_large,
)
from deployments.engines.protocol import EngineOutput
from deployments.lifecycle import LifeStream, RequestLife, Runtime
from deployments.openai_api import perf_headers, perf_metrics
from deployments.pool_gate import PoolGate
from deployments.prompts import PromptBuilder
from deployments.responses import ResponsesApi, ResponsesServing
from deployments.rate_limiter import ACTOR_NAMESPACE, LimiterClient, RateLimiter
from deployments.serving import LARGE_BODY_BYTES, SSE_DONE, ChatServing, CompletionServing, Job, dumps
from deployments.wire import peek_model
from deployments.telemetry import IngressTelemetry, configure_request_log
from policies.consistent_hash import stable_hash
from policies.rate_limit import RequestBucket

log = logging.getLogger("ember.ingress")

API_PREFIXES = ("/v1/", "/inference/v1/")
REPLICA_HEADER = "x-ember-replica"  # which pool replica served a request: for operators and benchmarks
REPLICA_SPAN_HEADER = "x-ember-replica-span"  # "start,end": when that replica held it (Unix seconds)


def _usage_row(row: dict) -> dict:
    """A ledger row for /v1/usage: the totals (batch included), and the batch part apart."""
    out = {k: v for k, v in row.items() if not k.startswith("batch_")}
    out["cost_usd"] = round(out["cost_usd"], 8)
    batch = {k[len("batch_"):]: v for k, v in row.items() if k.startswith("batch_")}
    batch["cost_usd"] = round(batch.get("cost_usd", 0.0), 8)
    out["batch"] = batch
    return out


class Ingress:
    def __init__(self, config: EmberConfig | dict, pools: dict[str, Any], demo_key_hash: str | None = None,
                 admin_token_hash: str | None = None, batch_runner: Any = None):
        """``batch_runner``: the handle of the batch runner deployment (a shared store), or None:
        the runner then runs in this process (``memory://``, one ingress replica)."""
        self.config = config if isinstance(config, EmberConfig) else EmberConfig.model_validate(config)
        self.stores = Stores(self.config.store.url)
        rl = self.config.rate_limit
        billing = Billing(self.stores, rl.default_spend_tier, fail_open=rl.on_store_error == "open",
                          outbox_path=outbox_path(self.config.store))
        self.auth = KeyAuth(self.stores.keys, demo_key_hash, self.config.auth.demo_account,
                            config=self.config.auth, accounts=self.stores.accounts)
        self.admin = AdminApi(self.stores, billing, admin_token_hash, self.auth.forget,
                              config=self.config.auth, auth=self.auth)
        self._limiter_actors: dict[int, Any] = {}
        served = [m for m in self.config.models if m.served]
        self.rt = Runtime(
            config=self.config,
            pools=pools,
            gates={m.id: PoolGate(m, self.config) for m in served},
            limiter=LimiterClient(rl, self._limiter_actor) if rl.enabled else None,
            billing=billing,
            telemetry=IngressTelemetry(self.config),
            failed_large=FailureThrottle(self.config.ingress.failed_large_limit,
                                         self.config.ingress.failed_large_window_s),
        )
        configure_request_log(self.config.observability)
        prompts = {m.id: PromptBuilder(m.model_dir) for m in served}
        self.chat = ChatServing(self.config, prompts, self._generative_model)
        self.completion = CompletionServing(self.config, prompts, self._generative_model)
        self.embeddings = EmbeddingServing(self.config, prompts, self._embedding_model)
        self.responses = ResponsesApi(self, ResponsesServing(self.config, prompts, self._generative_model),
                                      self.stores.responses, self.config.store.response_ttl_s)
        self._created = int(time.time())
        self._heavy: dict[str, asyncio.Lock] = {}  # account -> its turn at preparing a large body
        self._usage_reads: dict[str, RequestBucket] = {}
        self._routes: dict[tuple[str, str], Callable[[Request, str], Awaitable[Response]]] = {
            ("POST", "chat/completions"): lambda req, rid: self._generate(req, rid, self.chat),
            ("POST", "completions"): lambda req, rid: self._generate(req, rid, self.completion),
            ("POST", "embeddings"): lambda req, rid: self._generate(req, rid, self.embeddings),
            ("POST", "responses"): self.responses.create,
            ("GET", "models"): self.list_models,
            ("GET", "usage"): self.usage,
        }
        self.batch_runner = batch_runner
        self.local_runner = None  # set by the Serve wrapper when the runner runs in this process
        self.batch: BatchApi | None = None
        if self.config.batch.enabled:
            self.batch = BatchApi(self.config, self.stores.batches, BlobStore(self.config.batch.blob_url), self.rt,
                                  {"/v1/chat/completions": self.chat, "/v1/completions": self.completion},
                                  self.auth.account, self._body, self._kick_runner)
            self._batch_routes = self.batch.routes()
        else:
            self._batch_routes = {}

    def _kick_runner(self) -> None:
        if self.local_runner is not None:
            self.local_runner.kick()
        elif self.batch_runner is not None:
            self.batch_runner.kick.remote()  # fire and forget: the runner polls anyway

    async def batch_validate(self, batch_id: str) -> dict | None:
        """The runner's validation step (``BatchApi.validate``), through this replica's serving."""
        return await self.batch.validate(batch_id)

    async def batch_lines(self, account: str, endpoint: str, batch_id: str, lines: list, attempt: str) -> list[dict]:
        """The runner's line step (``BatchApi.run_lines``), through this replica's gates."""
        return await self.batch.run_lines(account, endpoint, batch_id, lines, attempt)

    async def batch_signal(self, model_id: str | None) -> dict:
        """Interactive traffic at the model's gate here, which the runner's pacing follows."""
        return self.batch.signal(model_id)

    async def batch_reconcile(self, batch_id: str) -> int:
        """The runner's billing check before a batch's output is written (``BatchApi.reconcile``)."""
        return await self.batch.reconcile(batch_id)

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

    async def __del__(self):
        self.rt.telemetry.flush()
        if self.rt.limiter is not None:
            await self.rt.limiter.close()
        await self.rt.billing.close()
        await self.auth.close()

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
        admin = self.admin.route(path)
        if admin is not None:
            return admin
        if path == "/openapi.json" and request.method == "GET":
            return self.openapi
        for prefix in API_PREFIXES:
            if path.startswith(prefix):
                tail = path[len(prefix):].rstrip("/")
                handler = self._routes.get((request.method, tail))
                if handler is not None:
                    return handler
                if request.method == "GET" and tail.startswith("accounts/"):
                    return lambda req, rid: self.account_info(req, tail[len("accounts/"):])
                if tail.startswith("responses/") and "/" not in tail[len("responses/"):]:
                    response_id = tail[len("responses/"):]
                    if request.method == "GET":
                        return lambda req, rid: self.responses.retrieve(req, response_id)
                    if request.method == "DELETE":
                        return lambda req, rid: self.responses.delete(req, response_id)
                if request.method == "GET" and tail.startswith("models/"):
                    # Model ids hold slashes: everything after "models/" is the id.
                    return lambda req, rid: self.retrieve_model(req, tail[len("models/"):])
                batch = self._batch_route(request.method, tail)
                if batch is not None:
                    return batch
                if any(t == tail for _, t in self._routes):
                    raise ApiError(405, f"method {request.method} is not allowed on {path}",
                                   code="method_not_allowed")
                break
        raise not_found(f"no route for {request.method} {path}", code="unknown_url")

    def _batch_route(self, method: str, tail: str):
        """Files and Batches routes: ``*`` in a pattern is one path segment, passed on."""
        parts = tail.split("/")
        for (m, pattern), handler in self._batch_routes.items():
            pat = pattern.split("/")
            if m != method or len(pat) != len(parts):
                continue
            if all(p == "*" or p == q for p, q in zip(pat, parts)):
                params = [q for p, q in zip(pat, parts) if p == "*"]
                return lambda req, rid, h=handler, a=params: h(req, rid, *a)
        if any(len(p.split("/")) == len(parts) and all(x == "*" or x == y for x, y in zip(p.split("/"), parts))
               for _, p in self._batch_routes):
            raise ApiError(405, f"method {method} is not allowed on /v1/{tail}", code="method_not_allowed")
        return None

    # -- operators and tests ------------------------------------------------------------

    def gate_state(self) -> dict[str, dict]:
        """Each pool gate's slots, in-flight count and queue (in-flight is 0 when idle)."""
        return {model_id: gate.state() for model_id, gate in self.rt.gates.items()}

    async def flush_usage(self, timeout_s: float = 10.0) -> int:
        """Deliver pending usage events now; returns how many are still pending."""
        await self.rt.billing.flush(timeout_s=timeout_s)
        return self.rt.billing.backlog()

    # -- shared steps -------------------------------------------------------------------

    async def _body(self, request: Request, limit: int | None = None) -> bytes:
        """The whole body, within its size limit (413; default ``max_body_bytes``) and its read
        deadline (408)."""
        deadline = self.config.ingress.body_read_timeout_s
        try:
            async with asyncio.timeout(deadline):
                return await self._read_body(request, limit or self.config.ingress.max_body_bytes)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {deadline:g} s",
                           code="body_timeout") from None

    async def _read_body(self, request: Request, limit: int) -> bytes:
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

    def _model(self, model_id: str, account: str) -> ModelConfig:
        model = self.config.model(model_id)
        if model is None or not self.config.is_visible(model, account):  # another tenant's: not there
            raise not_found(f"the model `{model_id}` does not exist or you do not have access to it",
                            param="model", code="model_not_found")
        lc = model.lifecycle
        if lc.status == "removed":
            instead = f"; use `{lc.replacement}` instead" if lc.replacement else ""
            raise not_found(f"the model `{model_id}` was removed on {lc.removal_date}{instead}",
                            param="model", code="model_removed")
        return model

    def _generative_model(self, model_id: str, account: str) -> ModelConfig:
        model = self._model(model_id, account)
        if model.task == "embed":
            raise bad_request(f"`{model_id}` is an embedding model: it serves POST /v1/embeddings, not text "
                              "generation", param="model", code="model_not_supported")
        return model

    def _embedding_model(self, model_id: str, account: str) -> ModelConfig:
        model = self._model(model_id, account)
        if model.task != "embed":
            raise bad_request(f"`{model_id}` generates text; embeddings need an embedding model",
                              param="model", code="model_not_supported")
        return model

    # -- generation ---------------------------------------------------------------------

    async def _generate(self, request: Request, rid: str, serving) -> Response:
        life, first, headers = await self.run_request(
            request, lambda account, body, hdrs: self._prepare(serving, rid, account, body, hdrs))
        try:
            if life.job.stream:
                return LifeStream(life, self._sse(life, first), headers)  # settles when the response ends
            outs = [out async for out in life.outputs(first)]
        except BaseException as exc:  # the client left, a deadline passed, a replica failed: settle what ran
            life.outcome = exc
            life.settle()
            raise
        life.settle()
        return self._whole(life, outs, headers)

    async def run_request(self, request: Request, prepare: Callable[[str, bytes, Any], Awaitable[Job]]
                          ) -> tuple[RequestLife, EngineOutput, dict[str, str]]:
        """A request's lifecycle up to its first output: auth, the account's place, the body,
        ``prepare(account, body, headers)`` (the Job), admission, a gate slot and dispatch.

        Returns the started life (the caller reads the rest and settles it), the first output and
        the headers every response carries. Whatever fails on the way is settled here.
        """
        started = time.perf_counter()
        account = await self.auth.account(request)
        life = RequestLife(self.rt, account, started)
        life.traceparent = request.headers.get("traceparent")
        try:
            life.enter()  # before the body: one tenant's slow senders cannot fill this replica
            body = await self._body(request)
            if self.rt.telemetry.capture_content:
                life.prompt_body, life.completion_text = body, {}
            model_id = peek_model(body)
            model = self.config.model(model_id) if model_id else None
            if model is not None and self.config.is_visible(model, account):
                await life.precheck(model)  # refused already? then without parsing or tokenizing
            life.job = await prepare(account, body, request.headers)
            headers = await life.admit()
            await life.take_slot()
            first = await life.start()
        except BaseException as exc:
            life.outcome = exc
            life.settle()
            raise
        return life, first, headers

    async def _prepare(self, serving, rid: str, account: str, body: bytes, headers) -> Job:
        """Parse, render and tokenize: on a worker thread for large bodies, so the event loop
        keeps serving other tenants, and one such body at a time per account."""
        if len(body) < LARGE_BODY_BYTES:  # parsed on the event loop: a thread costs more
            return serving.prepare(rid, account, body, headers)
        lock = self._heavy.setdefault(account, asyncio.Lock())
        try:
            async with lock:
                # Bodies queued behind this lock while the account's earlier ones failed are
                # refused here, not parsed.
                wait = self.rt.failed_large.retry_after(account)
                if wait is None:
                    return await asyncio.to_thread(serving.prepare, rid, account, body, headers)
        except Exception as exc:
            # A large body that fails validation cost this replica its parse: an account that
            # keeps sending them is refused for a while (and by the proxy, before their bodies).
            if to_error(exc).status < 500:
                self.rt.failed_large.failed(account)
            raise
        finally:
            if not lock.locked() and not getattr(lock, "_waiters", None):
                self._heavy.pop(account, None)
        raise too_many_failed_large(wait, self.config.ingress.failed_large_window_s)

    def _whole(self, life: RequestLife, outs, headers: dict[str, str]) -> Response:
        job, usage, final = life.job, life.usage, life.final
        assert usage is not None and final is not None
        metrics = life.server_metrics()
        body = job.renderer.response(outs, usage, job.engine_request.sampling.n)
        if job.perf_in_body:
            body["perf_metrics"] = perf_metrics(usage, metrics)
        headers.update(perf_headers(usage, metrics))
        if final.replica:
            headers[REPLICA_HEADER] = final.replica
        if final.replica_span:
            headers[REPLICA_SPAN_HEADER] = "{:.6f},{:.6f}".format(*final.replica_span)
        return Response(dumps(body), media_type="application/json", headers=headers)

    async def _sse(self, life: RequestLife, first) -> AsyncIterator[bytes]:
        job = life.job
        try:
            # The last output's chunk, the usage chunk and [DONE] leave as one message: each
            # one yielded here is a message to Serve's proxy.
            last = b""
            async for out in life.outputs(first):
                chunk = job.renderer.chunk(out)
                if out.final:
                    last = chunk or b""
                elif chunk is not None:
                    yield chunk
            usage = life.usage
            if usage is not None and (job.include_usage or job.perf_in_body):
                last += job.renderer.tail(usage, life.server_metrics() if job.perf_in_body else None,
                                          job.include_usage)
            yield last + SSE_DONE
        except Exception as exc:  # cancellation (the client left) passes through untouched
            life.outcome = exc
            yield error_sse_event(exc)
        finally:
            life.settle()

    # -- other endpoints ----------------------------------------------------------------

    async def openapi(self, request: Request, rid: str) -> Response:
        """The API's description, generated from the request models (public, like a docs page)."""
        from deployments.openapi import openapi_document

        return JSONResponse(openapi_document(self.config))

    def _model_card(self, m: ModelConfig) -> dict:
        lc = m.lifecycle
        return {
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
            "supports_tools": m.tool_call_parser is not None,
        }

    async def list_models(self, request: Request, rid: str) -> Response:
        account = await self.auth.account(request)
        data = [self._model_card(m) for m in self.config.models
                if m.served and self.config.is_visible(m, account)]
        return JSONResponse({"object": "list", "data": data})

    async def retrieve_model(self, request: Request, model_id: str) -> Response:
        """One model, as listed; another tenant's private model is not there (404)."""
        account = await self.auth.account(request)
        m = self.config.model(model_id)
        if m is None or not m.served or not self.config.is_visible(m, account):
            raise not_found(f"the model `{model_id}` does not exist or you do not have access to it",
                            param="model", code="model_not_found")
        return JSONResponse(self._model_card(m))

    async def usage(self, request: Request, rid: str) -> Response:
        """The caller's own usage and cost, by model and day."""
        account = await self.auth.account(request)
        # Each read costs store round trips and waits on pending writes: a per-account budget.
        rpm = self.config.ingress.usage_requests_per_minute
        now = time.monotonic()
        bucket = self._usage_reads.get(account) or RequestBucket.fresh(rpm, now)
        granted, wait, self._usage_reads[account] = bucket.take(rpm, now)
        if not granted:
            raise ApiError(429, f"usage is readable {rpm} times a minute; retry after {wait:.1f} s",
                           type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, math.ceil(wait)))})
        await self.rt.billing.flush(timeout_s=2.0)  # this replica's own pending writes first
        rows = await self.stores.ledger.totals(account)
        self.rt.billing.forget(account)
        acct = await self.rt.billing.account(account)
        return JSONResponse({
            "object": "usage",
            "account": account,
            "spend_tier": acct.spend_tier,
            "total_cost_usd": round(acct.total_usd, 6),
            "month_cost_usd": round(acct.month_usd, 6),
            "monthly_spend_limit_usd": acct.monthly_limit_usd,
            "data": [_usage_row(r) for r in rows],
        })

    async def account_info(self, request: Request, account_id: str) -> Response:
        account = await self.auth.account(request)
        if account_id != account:  # another account's data does not exist, as far as callers can tell
            raise not_found(f"account `{account_id}` not found", param="account", code="account_not_found")
        acct = await self.rt.billing.account(account)
        return JSONResponse({"object": "account", "id": account, "spend_tier": acct.spend_tier,
                             "monthly_spend_limit_usd": acct.monthly_limit_usd,
                             "month_cost_usd": round(acct.month_usd, 6)})


"""What happens to a request: one object owns everything a generation request acquires.

A ``RequestLife`` takes, in order: one of its account's concurrent-request places in this
ingress (before the body is read), an admission (spend check and a rate-limit reservation), a
slot at the pool's gate, and an engine stream on a pool replica. Cheap refusals come before
costly work: the account's place and a remembered 429 are checked before the body is parsed and
tokenized. ``settle()`` gives back exactly what was taken, exactly once, on every way out:

================================  ===========  ===============  ==========================  =========
exit                              slot         engine request   rate-limit reservation      usage event
================================  ===========  ===============  ==========================  =========
normal end                        released     ended by itself  settled to usage            usage
client leaves before dispatch     released*    —                refunded                    none
client leaves after output began  released     aborted          prompt + generated so far   same
deadline (504) or stalled stream  released     aborted          what ran (as above)         same
replica lost before any output    retried once on another replica, then 503; nothing billed
replica lost mid-stream           released     (gone)           what ran                    same
ingress shutdown                  Serve cancels the request: as "client leaves"
================================  ===========  ===============  ==========================  =========

(* if it held one.) Releasing a slot also settles the account's fair-share charge at the gate
(estimated when the slot was taken) to the usage billed. "What ran" is what the ingress has seen: the first output carries the
prompt's cached-token count, later outputs the tokens generated so far (streams coalesce per
``engine.stream_interval_s``, non-streamed requests report progress every
``NON_STREAM_PROGRESS_S``). A request that produced no output is not billed: nothing shows that
the engine ran it. A batch line is billed only when its result is stored (``result_stored``, set
by ``deployments.batch_api`` in the same step): one cut short is run again by the batch runner
under the same op id, and that run is what it pays for; one that finished after its batch's
results were sealed (cancelled) is in no output and is not billed.

``settle()`` is synchronous and never raises, so it is safe in ``finally`` blocks while the task
is being cancelled; the usage event it writes is durable (``deployments.billing``'s outbox)
before it returns. Streams call it from the response's own ``__call__`` (``LifeStream``), which
Serve runs and cancels, because a generator's ``finally`` never runs if the client leaves before
the first chunk, and a Starlette background task never runs on cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from starlette.responses import StreamingResponse

from cluster.config import EmberConfig, ModelConfig
from cluster.stores import StoreUnavailable
from deployments.auth import FailureThrottle
from deployments.billing import Billing, price_for
from deployments.engines.protocol import EngineMetrics, EngineOutput, Usage
from deployments.errors import (
    ApiError,
    is_replica_loss,
    request_timeout,
    store_unavailable,
    stream_interrupted,
    stream_stalled,
    too_many_failed_large,
)
from deployments.pool_gate import PoolGate
from deployments.rate_limiter import Admission, LimiterClient, rate_limit_headers
from deployments.serving import Job
from deployments.wire import hold_headers
from policies.pricing import request_cost

log = logging.getLogger("ember.lifecycle")

NON_STREAM_PROGRESS_S = 0.5  # how often a non-streamed request's replica reports progress
SPEND_WARNING_HEADER = "x-ember-spend-warning"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Runtime:
    """What every request of one ingress replica shares."""

    config: EmberConfig
    pools: dict[str, Any]  # model id -> DeploymentHandle of its pool
    gates: dict[str, PoolGate]
    limiter: LimiterClient | None
    billing: Billing
    in_flight: dict[str, int] = field(default_factory=dict)  # account -> requests in this replica
    telemetry: Any = None  # deployments.telemetry.IngressTelemetry: told of each request once, at settlement
    # Accounts whose large bodies keep failing validation (see IngressConfig.failed_large_limit).
    failed_large: FailureThrottle | None = None


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


class RequestLife:
    def __init__(self, rt: Runtime, account: str, started: float):
        self.rt = rt
        self.job: Job | None = None  # set once the body is parsed
        self.account = account
        self.started = started  # perf_counter at arrival
        self.entered = False
        self.spend_reserved = 0.0
        self.admission: Admission | None = None
        self.gate: PoolGate | None = None
        self.charged = 0.0  # the fair-share charge taken with the slot, settled to the real usage
        self.stream: Any = None  # DeploymentResponseGenerator
        self.dispatched_at = 0.0
        self.cached: int | None = None
        self.generated = 0
        self.final: EngineOutput | None = None
        self.settled = False
        self.billed: dict | None = None  # the usage event, once written
        self.result_stored = False  # a batch line: its result is stored, so it is billed
        self.preempted = False  # a batch line stopped by the gate for an interactive request
        # For telemetry (perf_counter times; 0.0: not reached), and how the request ended.
        self.created_at = time.perf_counter()  # authenticated
        self.admit_at = self.admitted_at = self.queued_at = self.slotted_at = 0.0
        self.outcome: BaseException | None = None
        self.traceparent: str | None = None
        self.prompt_body: bytes | None = None
        # Each choice's text as it streams, kept only when capture_content is on (else None).
        self.completion_text: dict[int, list[str]] | None = None
        self.span: Any = None  # the trace's root span, when traced
        self.span_offset_ns = 0
        self.checked_model: ModelConfig | None = None  # a model precheck() refused for, before parsing

    # -- acquiring -----------------------------------------------------------------------------

    def enter(self) -> None:
        """Take one of the account's concurrent-request places (429 when they are all taken)."""
        if self.rt.failed_large is not None:
            wait = self.rt.failed_large.retry_after(self.account)
            if wait is not None:
                raise too_many_failed_large(wait, self.rt.config.ingress.failed_large_window_s)
        cap = self.rt.config.ingress.max_concurrent_per_account
        held = self.rt.in_flight.get(self.account, 0)
        if held >= cap:
            raise ApiError(429, f"too many concurrent requests: at most {cap} per account at a time",
                           type="rate_limit_error", code="concurrency_limit_exceeded",
                           headers={"Retry-After": "1"})
        self.rt.in_flight[self.account] = held + 1
        self.entered = True

    async def precheck(self, model: ModelConfig) -> None:
        """The refusals that need no parsing: spend limit reached, a 429 moments ago."""
        self.checked_model = model
        acct = await self._account_view()
        _check_spend(acct)
        if self.rt.limiter is not None:
            refused = self.rt.limiter.refused(self.account, model)
            if refused is not None:
                raise _rate_limited(model, refused, lifecycle_headers(model), self.rt.config)

    async def _account_view(self):
        try:
            return await self.rt.billing.account(self.account)
        except StoreUnavailable:
            raise store_unavailable("the account store") from None

    async def admit(self) -> dict[str, str]:
        """Spend limit (402) and rate limits (429), decided at once, never queued.

        Returns the headers every response carries: rate limits, lifecycle, spend warnings.
        """
        self.admit_at = time.perf_counter()
        model = self.job.model
        headers = lifecycle_headers(model)
        acct = await self._account_view()
        _check_spend(acct)
        req = self.job.engine_request
        price, discount = price_for(model, self.job.billed_tier)
        worst = request_cost(price, len(req.prompt_token_ids), 0, req.sampling.max_tokens * req.sampling.n, discount)
        if not self.rt.billing.reserve_spend(acct, worst):
            raise ApiError(402, f"this request may cost up to ${worst:.4f}, which would pass the monthly spend "
                                f"limit of ${acct.monthly_limit_usd:.2f} (${acct.month_usd:.2f} spent and "
                                "requests running); lower max_tokens or raise the limit",
                           type="billing_error", code="spend_limit_reached")
        self.spend_reserved = worst
        if acct.status == "warn":
            headers[SPEND_WARNING_HEADER] = (f"{acct.month_usd / acct.monthly_limit_usd:.0%} of the monthly "
                                             f"spend limit of ${acct.monthly_limit_usd:.2f} is used")
        limiter = self.rt.limiter
        if limiter is None:
            return headers
        cost = limiter.reservation(len(req.prompt_token_ids), req.sampling.max_tokens, req.sampling.n)
        try:
            adm = await limiter.admit(self.account, model, acct.spend_tier, cost)
        except StoreUnavailable:
            raise store_unavailable("rate limiting") from None
        if not adm.allowed:
            raise _rate_limited(model, adm, headers, self.rt.config)
        headers.update(rate_limit_headers(adm, self.rt.config.rate_limit.requests_per_minute))
        self.admission = adm
        self.admitted_at = time.perf_counter()
        return headers

    async def take_slot(self) -> None:
        gate = self.rt.gates[self.job.model.id]
        self.queued_at = time.perf_counter()
        req = self.job.engine_request
        self.charged = await gate.acquire(self.job.billed_tier, self.job.model.id, self.account,
                                          len(req.prompt_token_ids), req.sampling.max_tokens * req.sampling.n)
        self.gate = gate
        self.slotted_at = time.perf_counter()

    async def start(self) -> EngineOutput:
        """Dispatch to a replica and wait for the first output.

        A replica lost before it sent anything (killed, restarting, its engine dead) costs the
        caller nothing: the request goes once more, under a derived session key so that the ring
        places it afresh if the lost replica still looks alive.
        """
        ing = self.rt.config.ingress
        interval = None if self.job.stream else NON_STREAM_PROGRESS_S
        if self.rt.telemetry is not None:
            self.job.engine_request.trace_context = self.rt.telemetry.dispatched(self)
        for attempt in (0, 1):
            session = self.job.session if attempt == 0 else self.job.session + "#retry"
            # The proxy attaches a session id only on its own hop; this hop needs it set again.
            pool = self.rt.pools[self.job.model.id].options(session_id=session, stream=True)
            self.dispatched_at = time.perf_counter()
            self.stream = pool.generate_stream.remote(self.job.engine_request, interval)
            try:
                return await self._next(ing.request_timeout_s, request_timeout())
            except Exception as exc:
                if attempt == 1 or not is_replica_loss(exc):
                    raise
                log.warning("replica lost before the first output of %s; retrying once",
                            self.job.engine_request.request_id)
                self.stream.cancel()
                self.stream = None
        raise AssertionError("unreachable")

    async def next(self) -> EngineOutput:
        """The next output of a started request, within the deadlines."""
        ing = self.rt.config.ingress
        if self.job.stream:
            return await self._next(ing.stream_idle_timeout_s, stream_stalled(ing.stream_idle_timeout_s))
        left = ing.request_timeout_s - (time.perf_counter() - self.started)
        return await self._next(max(left, 0.0), request_timeout())

    async def _next(self, timeout_s: float, on_timeout: ApiError) -> EngineOutput:
        try:
            async with asyncio.timeout(timeout_s):
                out: EngineOutput = await self.stream.__anext__()
        except TimeoutError:
            raise on_timeout from None
        except StopAsyncIteration:
            raise stream_interrupted() from None
        except Exception as exc:
            if is_replica_loss(exc) and self.cached is not None:
                raise stream_interrupted() from exc  # output began: what came is billed
            raise
        self._saw(out)
        return out

    def _saw(self, out: EngineOutput) -> None:
        if out.cached_tokens is not None and self.cached is None:
            self.cached = out.cached_tokens
        for d in out.deltas:
            self.generated += len(d.token_ids)
            if self.completion_text is not None:
                self.completion_text.setdefault(d.index, []).append(d.text)
        if self.cached is None and out.deltas:
            self.cached = 0  # an engine that reports no cached count: bill the prompt uncached
        if out.final:
            self.final = out
            if out.metrics is not None and self.gate is not None:
                self.gate.observe(out.metrics.processing_time_s)

    async def outputs(self, first: EngineOutput) -> AsyncIterator[EngineOutput]:
        out = first
        while True:
            yield out
            if out.final:
                return
            out = await self.next()

    # -- reading -------------------------------------------------------------------------------

    @property
    def usage(self) -> Usage | None:
        """What the request is billed for: the engine's usage, or what ran before it ended early."""
        if self.final is not None and self.final.usage is not None:
            return self.final.usage
        if self.cached is None:
            return None  # no output: nothing shows the engine ran it
        return Usage(len(self.job.engine_request.prompt_token_ids), self.generated, self.cached)

    def server_metrics(self) -> EngineMetrics:
        # Server time counts from the ingress receiving the request: time spent here before
        # dispatch plus what the engine measured.
        m = (self.final.metrics if self.final is not None else None) or EngineMetrics(0.0, 0.0)
        before = self.dispatched_at - self.started
        return EngineMetrics(before + m.time_to_first_token_s, time.perf_counter() - self.started)

    # -- settling ------------------------------------------------------------------------------

    def settle(self) -> None:
        """Give back what was taken, once; safe to call on every path, never raises."""
        if self.settled:
            return
        self.settled = True
        if self.entered:
            left = self.rt.in_flight.get(self.account, 1) - 1
            if left > 0:
                self.rt.in_flight[self.account] = left
            else:
                self.rt.in_flight.pop(self.account, None)
        if self.job is None:
            self._tell_telemetry()
            return  # nothing past the account's place was taken
        if self.spend_reserved:
            _quietly(self.rt.billing.release_spend, self.account, self.spend_reserved)
        usage = self.usage
        if self.stream is not None and self.final is None:
            _quietly(self.stream.cancel)  # Serve cancels the replica's generator: the engine aborts
        u = usage or Usage(0, 0, 0)
        if self.gate is not None:
            _quietly(self.gate.correct, self.job.billed_tier, self.account, self.charged, u.prompt_tokens,
                     u.completion_tokens)
            _quietly(self.gate.release, self.job.billed_tier, self, self.account)
        if self.admission is not None and self.rt.limiter is not None:
            _quietly(self.rt.limiter.settle, self.admission, u.prompt_tokens, u.cached_tokens,
                     u.completion_tokens)
        if self.job.billed_tier == "batch" and not (self.result_stored and self.final is not None):
            # An interrupted batch line runs again under the same op id, and a finished one whose
            # result was refused (its batch sealed) is in no output: only a stored answer is billed.
            self._tell_telemetry()
            return
        if usage is not None and (usage.prompt_tokens or usage.completion_tokens):
            self.billed = _quietly(self.rt.billing.bill, self.job.op_id or self.job.engine_request.request_id,
                                   self.account, self.job.model, self.job.billed_tier, usage.prompt_tokens,
                                   usage.cached_tokens, usage.completion_tokens)
        self._tell_telemetry()

    def _tell_telemetry(self) -> None:
        if self.rt.telemetry is not None:
            _quietly(self.rt.telemetry.finished, self)


def _check_spend(acct) -> None:
    if acct.status == "stop":
        raise ApiError(402, f"the monthly spend limit of ${acct.monthly_limit_usd:.2f} is reached "
                            f"(${acct.month_usd:.2f} spent this month); raise it to continue",
                       type="billing_error", code="spend_limit_reached")


def _rate_limited(model: ModelConfig, adm: Admission, headers: dict[str, str], config: EmberConfig) -> ApiError:
    what = {"requests": "requests per minute", "prompt": "prompt tokens per minute",
            "uncached": "uncached (cache-adjusted) prompt tokens per minute",
            "generated": "generated tokens per minute"}.get(adm.exhausted or "", adm.exhausted)
    return ApiError(429, f"rate limit exceeded for {model.id}: {what}; retry after {adm.retry_after_s:.3f} s",
                    type="rate_limit_error", code="rate_limit_exceeded", param=adm.exhausted,
                    headers={**headers, **rate_limit_headers(adm, config.rate_limit.requests_per_minute),
                             "Retry-After": str(max(1, math.ceil(adm.retry_after_s))),
                             # Serve's proxy repeats it for this key and model, as briefly as the
                             # limiter remembers it (at most 1 s: a smaller request may fit then).
                             **hold_headers(min(adm.retry_after_s, 1.0), model.id)})


def _quietly(fn, *args):
    try:
        return fn(*args)
    except Exception:  # one failing step must not skip the others
        log.exception("settling a request: %s failed", getattr(fn, "__qualname__", fn))
        return None


class LifeStream(StreamingResponse):
    """A streamed response that settles its request however the response ends.

    Serve awaits this object's ``__call__`` and cancels it when the client leaves; the ``finally``
    runs then too, even if the body generator never started.
    """

    def __init__(self, life: RequestLife, body: AsyncIterator[bytes], headers: dict[str, str]):
        super().__init__(body, media_type="text/event-stream", headers={**headers, **SSE_HEADERS})
        self.life = life

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.life.settle()

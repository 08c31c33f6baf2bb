"""What an operator sees: Prometheus metrics, OpenTelemetry traces and one JSON log line per request.

**Metrics** go through Ray's metrics (``ray.util.metrics``): every Ray process (ingress replicas,
pool replicas, the routers inside the ingress's handles, the Serve controller running the
autoscaling policy) records into its core worker, and the node's metrics agent exports the sum
at the node's metrics export port, the one Prometheus already scrapes on a Ray cluster. Ray adds
its namespace to every name, so ``ember_requests_total`` is exported as
``ray_ember_requests_total``; the Prometheus recipe (``cluster/observability/prometheus.yml``)
strips the ``ray_`` prefix at scrape time, and the dashboard queries the ``ember_*`` names. Each series also carries Ray's labels (``WorkerId``,
``NodeAddress``...): sum over them. Accounts appear in labels only as the top N by traffic
(``policies/cardinality.py``); every other account is ``other``.

Nothing of this is on a request's path: the ingress takes a settled request's numbers and records
them, with its log line and its spans, in batches about ``RECORD_DELAY_S`` later (and at replica
shutdown); counters are summed in the process and handed to Ray about once a second
(``_Counts``). A replica that is killed loses at most that much of its telemetry, never a
request or its bill.

Why not OpenTelemetry metrics with a Prometheus reader: each replica process would need its own
HTTP port, and a scrape would need every replica's address. Ray already aggregates per node and
is what a Ray cluster's Prometheus scrapes.

**Traces** use the OpenTelemetry SDK with Ember's own ``TracerProvider`` (the process's global
provider is left alone). One trace per request:

- ``chat <model>`` / ``text_completion <model>``: the ingress's root span, a child of the caller's
  ``traceparent`` when one is sent, from the request's arrival to its settlement; children
  ``ember.auth``, ``ember.prepare`` (parse, render, tokenize), ``ember.admission`` (spend and rate
  limits) and ``ember.gate.wait`` (the queue at the pool's gate);
- ``ember.route``: the router's decision (replica, reason, whether it waited for the owner);
- ``ember.replica``: the pool replica's stream, and under it ``ember.engine`` with
  ``ember.engine.queue``, ``ember.engine.prefill`` (ending at the first token) and
  ``ember.engine.decode``.

Spans are created when each step is over, with the step's own start and end times, so the hot
path only takes timestamps; with tracing off (the default) no span object is ever created. The
context crosses the Ray hops as a W3C carrier in the request itself
(``EngineRequest.trace_context``), which the router and the replica read. Prompt and completion
text never enter a span or a log line unless ``observability.capture_content`` is on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Sequence

from cluster.config import EmberConfig, MetricsConfig, ModelConfig, ObservabilityConfig, TracingConfig
from policies.cardinality import AccountLabels

log = logging.getLogger("ember.telemetry")
request_log = logging.getLogger("ember.requests")

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
ITL_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0]
WAIT_BUCKETS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]
RATIO_BUCKETS = [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]
CLIENT_CLOSED = 499  # nginx's status for a client that left before the response ended


# -- metrics ----------------------------------------------------------------------------------------

class _Series:
    """The ``ember_*`` series of one process, created on first use (Ray registers each with the
    process's core worker)."""

    _instance: "_Series | None" = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        acct = ("model", "tier", "account")
        self.requests = Counter("ember_requests", "Generation requests by model, tier, HTTP status and "
                                "reason (429: the budget; 503: why; 499: the client left)",
                                tag_keys=("model", "tier", "status", "reason", "account"))
        self.refusals = Counter("ember_rate_limit_refusals", "Requests refused by a rate limit, by budget",
                                tag_keys=("model", "budget", "account"))
        self.prompt_tokens = Counter("ember_prompt_tokens", "Prompt tokens billed", tag_keys=acct)
        self.cached_tokens = Counter("ember_cached_tokens", "Prompt tokens served from the prefix cache",
                                     tag_keys=acct)
        self.generated_tokens = Counter("ember_generated_tokens", "Generated tokens billed", tag_keys=acct)
        self.cache_hit_ratio = Histogram("ember_cache_hit_ratio", "Cached / prompt tokens, per request",
                                         boundaries=RATIO_BUCKETS, tag_keys=("model",))
        self.ttft = Histogram("ember_time_to_first_token_seconds", "Server time to the first token",
                              boundaries=LATENCY_BUCKETS, tag_keys=("model", "tier"))
        self.itl = Histogram("ember_inter_token_latency_seconds",
                             "Mean time between generated tokens after the first, per request",
                             boundaries=ITL_BUCKETS, tag_keys=("model", "tier"))
        self.e2e = Histogram("ember_request_duration_seconds", "Server time from arrival to settlement",
                             boundaries=LATENCY_BUCKETS, tag_keys=("model", "tier", "status"))
        self.gate_wait = Histogram("ember_gate_wait_seconds", "Time waiting for a slot at the pool's gate",
                                   boundaries=WAIT_BUCKETS, tag_keys=("model", "tier"))
        self.gate_queue = Gauge("ember_gate_queue_depth", "Requests waiting at the gate, per ingress replica",
                                tag_keys=("model", "tier"))
        self.gate_in_flight = Gauge("ember_gate_in_flight", "Slots taken at the gate, per ingress replica",
                                    tag_keys=("model",))
        self.gate_slots = Gauge("ember_gate_slots", "Slots of the gate, per ingress replica", tag_keys=("model",))
        self.ledger_backlog = Gauge("ember_ledger_backlog_events",
                                    "Usage events written to the outbox and not yet in the ledger")
        self.running = Gauge("ember_pool_running_sequences", "Sequences the replica's engine runs",
                             tag_keys=("model", "replica"))
        self.waiting = Gauge("ember_pool_waiting_sequences", "Sequences waiting in the replica's engine",
                             tag_keys=("model", "replica"))
        self.capacity = Gauge("ember_pool_capacity_sequences", "Sequences the replica's engine may run at once",
                              tag_keys=("model", "replica"))
        self.routing = Counter("ember_routing_decisions", "Router placements: outcome owner, home, alternate "
                               "or keyless; waited: whether it waited for the owner first",
                               tag_keys=("pool", "outcome", "waited"))
        self.autoscale_target = Gauge("ember_autoscaling_target_replicas", "Replicas the policy asks for",
                                      tag_keys=("deployment",))
        self.autoscale_load = Gauge("ember_autoscaling_load_replicas",
                                    "Replicas' worth of load the policy sees", tag_keys=("deployment",))

        self.counts = _Counts()

    @classmethod
    def get(cls) -> "_Series":
        if cls._instance is None:
            with cls._lock:
                if cls._instance is None:
                    cls._instance = cls()
        return cls._instance


class _Counts:
    """Counter increments of one process, summed locally and handed to Ray at most once a
    ``FLUSH_S`` per series and label set (Ray exports every few seconds anyway): a request adds to
    a dict instead of calling into the core worker for each counter. Thread-safe: the routers of
    the ingress's handles run on their own event loop thread."""

    FLUSH_S = 1.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._sums: dict[tuple[Any, tuple], float] = {}
        self._lock = threading.Lock()
        self._flushed = clock()

    def add(self, counter: Any, tags: tuple, value: float) -> None:
        """``tags``: the label values in the counter's ``tag_keys`` order."""
        key = (counter, tags)
        with self._lock:
            self._sums[key] = self._sums.get(key, 0.0) + value
        if self.clock() - self._flushed >= self.FLUSH_S:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            sums, self._sums = self._sums, {}
            self._flushed = self.clock()
        for (counter, tags), value in sums.items():
            counter.inc(value, tags=dict(zip(counter._tag_keys, tags)))


def record_routing(pool: str, outcome: str, waited: bool) -> None:
    """One router placement (``deployments.affinity_router``)."""
    s = _Series.get()
    s.counts.add(s.routing, (pool, outcome, "true" if waited else "false"), 1.0)


def record_autoscaling(deployment: str, target: int, load: float) -> None:
    """One decision of Ember's autoscaling policy (``deployments.autoscaling``), in the controller."""
    try:
        s = _Series.get()
        s.autoscale_target.set(float(target), tags={"deployment": deployment})
        s.autoscale_load.set(float(load), tags={"deployment": deployment})
    except Exception:  # metrics must never break the policy
        log.debug("autoscaling metrics failed", exc_info=True)


# -- tracing ----------------------------------------------------------------------------------------

_PROVIDER: Any = None
_PROVIDER_LOCK = threading.Lock()


def tracing_exporter(cfg: TracingConfig) -> str:
    if cfg.exporter is not None:
        return cfg.exporter
    return (os.environ.get("OTEL_TRACES_EXPORTER") or "none").split(",")[0].strip().lower() or "none"


def tracer(cfg: TracingConfig | None = None):
    """This process's tracer: set up from ``cfg`` on first call; None while tracing is off."""
    global _PROVIDER
    if _PROVIDER is None and cfg is not None:
        exporter = tracing_exporter(cfg)
        if exporter == "none" or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
            return None
        with _PROVIDER_LOCK:
            if _PROVIDER is None:
                _PROVIDER = _provider(cfg, exporter)
    return _PROVIDER.get_tracer("ember") if _PROVIDER is not None else None


def _provider(cfg: TracingConfig, exporter: str):
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    ratio = cfg.sample_ratio
    if ratio is None:
        ratio = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG") or 1.0)
    provider = TracerProvider(resource=Resource.create({"service.name": cfg.service_name}),
                              sampler=ParentBased(TraceIdRatioBased(ratio)))
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # OTEL_EXPORTER_OTLP_* env
    elif exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "file":
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(cfg.file_dir)))
    else:
        raise ValueError(f"unknown trace exporter {exporter!r}: none, otlp, console or file")
    return provider


class JsonLinesSpanExporter:
    """Spans as JSON lines in ``<dir>/spans-<pid>.jsonl``, one file per process (local runs, tests)."""

    def __init__(self, directory: str | None):
        import tempfile

        self.dir = directory or os.path.join(tempfile.gettempdir(), "ember-spans")
        os.makedirs(self.dir, exist_ok=True)
        self.path = os.path.join(self.dir, f"spans-{os.getpid()}.jsonl")
        self._lock = threading.Lock()

    def export(self, spans: Sequence[Any]):
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = [json.dumps(span_record(s), separators=(",", ":")) for s in spans]
        with self._lock, open(self.path, "a") as f:
            f.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def span_record(span: Any) -> dict:
    ctx = span.get_span_context()
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "parent_is_remote": bool(span.parent.is_remote) if span.parent is not None else None,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, "time_ns": e.timestamp, "attributes": dict(e.attributes or {})}
                   for e in span.events],
        "resource": dict(span.resource.attributes),
    }


def _context_of(carrier: dict[str, str] | None):
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(carrier or {})


def _carrier(span) -> dict[str, str]:
    from opentelemetry.trace import set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=set_span_in_context(span))
    return carrier


def _child(tr, name: str, parent, start_ns: int, end_ns: int, **attrs) -> Any:
    from opentelemetry.trace import set_span_in_context

    span = tr.start_span(name, context=set_span_in_context(parent), start_time=start_ns, attributes=attrs)
    span.end(end_time=max(end_ns, start_ns))
    return span


def observe_placement(pool: str, pending_request: Any, replica: str, reason: str, waited: bool,
                      started_s: float, metrics: bool) -> None:
    """The router placed a request (monotonic ``started_s``): count it, and trace it when the
    request carries a trace context."""
    if metrics:
        record_routing(pool, reason, waited)
    if _PROVIDER is not None and pending_request is not None and pending_request.args:
        carrier = getattr(pending_request.args[0], "trace_context", None)
        if carrier:
            trace_route(carrier, pool, replica, reason, waited, started_s, time.monotonic())


def trace_route(carrier: dict[str, str] | None, pool: str, replica: str, reason: str, waited: bool,
                started_s: float, ended_s: float) -> None:
    """The router's span (monotonic times of the decision), under the request's root span."""
    tr = tracer()
    if tr is None or not carrier:
        return
    from opentelemetry import trace as ot

    offset = time.time_ns() - int(time.monotonic() * 1e9)
    span = tr.start_span("ember.route", context=_context_of(carrier), start_time=offset + int(started_s * 1e9),
                         attributes={"ember.pool": pool, "ember.replica": replica, "ember.route.reason": reason,
                                     "ember.route.waited": waited}, kind=ot.SpanKind.INTERNAL)
    span.end(end_time=offset + int(ended_s * 1e9))


# -- the ingress -------------------------------------------------------------------------------------

def _status_of(exc: BaseException | None, life) -> tuple[int, str]:
    """(HTTP status, reason) of a settled request."""
    if exc is None:
        if life.final is not None:
            return 200, ""
        return CLIENT_CLOSED, "client_closed"  # the response ended before the engine's final output
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return CLIENT_CLOSED, "client_closed"
    from deployments.errors import to_error

    err = to_error(exc)
    if err.status == 429 and err.code == "rate_limit_exceeded" and err.param:
        return 429, err.param  # the budget: prompt, uncached, generated, requests
    return err.status, err.code or err.type or ""


class IngressTelemetry:
    """Per ingress replica: turns each settled ``RequestLife`` into metrics, a log line and spans."""

    def __init__(self, config: EmberConfig, clock: Callable[[], float] = time.monotonic):
        obs: ObservabilityConfig = config.observability
        m: MetricsConfig = obs.metrics
        self.metrics = _Series.get() if m.enabled else None
        self.accounts = AccountLabels(m.top_accounts, m.account_half_life_s, m.account_refresh_s)
        self.clock = clock
        self.sample_interval_s = m.sample_interval_s
        self.tracer = tracer(obs.tracing)
        self.capture_content = obs.capture_content
        self.request_log = obs.request_log
        self._pending: list[tuple[Any, float, Any]] = []  # settled, not yet recorded

    # At dispatch: the trace's root span and what happened before it; the carrier for the hop.
    def dispatched(self, life) -> dict[str, str] | None:
        if self.tracer is None:
            return None
        root = self._root(life)
        if root is None or not root.is_recording():
            return None
        return _carrier(root)

    def _root(self, life):
        if life.span is None:
            from opentelemetry import trace as ot

            job = life.job
            offset = time.time_ns() - time.perf_counter_ns()
            life.span_offset_ns = offset
            name = f"{_operation(job)} {job.model.id}" if job is not None else "ember.request"
            parent = _context_of({"traceparent": life.traceparent}) if life.traceparent else None
            root = self.tracer.start_span(name, context=parent, kind=ot.SpanKind.SERVER,
                                          start_time=offset + int(life.started * 1e9))
            life.span = root
            if root.is_recording():
                at = lambda t: offset + int(t * 1e9)  # noqa: E731
                _child(self.tracer, "ember.auth", root, at(life.started), at(life.created_at))
                if life.admit_at:
                    _child(self.tracer, "ember.prepare", root, at(life.created_at), at(life.admit_at))
                if life.admitted_at:
                    _child(self.tracer, "ember.admission", root, at(life.admit_at), at(life.admitted_at))
                if life.slotted_at:
                    _child(self.tracer, "ember.gate.wait", root, at(life.queued_at), at(life.slotted_at),
                           **{"ember.gate.wait_s": life.slotted_at - life.queued_at})
        return life.span

    # At settlement, once per request.
    def finished(self, life) -> None:
        """Called once at settlement, which for a non-streamed request is before its response
        leaves: take the request's numbers now and record them later, in a batch, off the
        response's path (``RECORD_DELAY_S``; at once past ``RECORD_BACKLOG`` requests)."""
        now = time.perf_counter()
        m = life.server_metrics() if life.final is not None and life.final.metrics is not None else None
        self._pending.append((life, now, m))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): record at once
            self.flush()
            return
        if len(self._pending) == self.RECORD_BACKLOG:
            loop.call_soon(self._record_some)
        elif len(self._pending) == 1:
            loop.call_later(self.RECORD_DELAY_S, self._record_some)

    RECORD_DELAY_S = 0.5
    RECORD_BACKLOG = 1024
    RECORD_SLICE = 32  # requests recorded per turn of the event loop

    def _record_some(self) -> None:
        """Record up to ``RECORD_SLICE`` settled requests; the rest on the next turn of the loop, so
        that responses in flight are not held behind a long batch."""
        batch, self._pending[:self.RECORD_SLICE] = self._pending[:self.RECORD_SLICE], []
        self._record_batch(batch)
        if self._pending:
            try:
                asyncio.get_running_loop().call_soon(self._record_some)
            except RuntimeError:
                self.flush()
        elif self.metrics is not None:
            self.metrics.counts.flush()

    def flush(self) -> None:
        """Record every settled request now (at shutdown; tests)."""
        batch, self._pending = self._pending, []
        self._record_batch(batch)
        if self.metrics is not None:
            self.metrics.counts.flush()

    def _record_batch(self, batch: list) -> None:
        lines = []
        for life, now, m in batch:
            record = self._emit(life, now, m)
            if record is not None:
                lines.append(json.dumps(record, separators=(",", ":")))
        if lines:  # one write for the batch: one JSON object per line
            request_log.info("\n".join(lines))

    def _emit(self, life, now: float, m) -> dict | None:
        status, reason = _status_of(life.outcome, life)
        job = life.job
        usage = life.usage
        checked = job.model if job is not None else life.checked_model
        model = checked.id if checked is not None else "unknown"
        tier = job.billed_tier if job is not None else "unknown"
        try:
            if self.metrics is not None:
                self._metrics(life, job, model, tier, status, reason, usage, now, m)
            record = self._record(life, job, model, tier, status, reason, usage, now, m) if self.request_log else None
            if self.tracer is not None and (life.span is not None or job is not None):
                self._end_trace(life, job, status, reason, usage, now, record)
            return record
        except Exception:  # telemetry never fails a request
            log.exception("recording telemetry of a request failed")
            return None

    def _metrics(self, life, job, model, tier, status, reason, usage, now, m) -> None:
        s = self.metrics
        add = s.counts.add
        account = self.accounts.label(life.account, self.clock())
        add(s.requests, (model, tier, str(status), reason, account), 1.0)
        if status == 429 and reason in ("prompt", "uncached", "generated", "requests"):
            add(s.refusals, (model, reason, account), 1.0)
        if job is None:
            return
        mt = {"model": model, "tier": tier}
        s.e2e.observe(now - life.started, tags={**mt, "status": str(status)})
        if life.slotted_at:
            s.gate_wait.observe(life.slotted_at - life.queued_at, tags=mt)
        if usage is not None and (usage.prompt_tokens or usage.completion_tokens):
            at = (model, tier, account)
            add(s.prompt_tokens, at, float(usage.prompt_tokens))
            if usage.cached_tokens:
                add(s.cached_tokens, at, float(usage.cached_tokens))
            if usage.completion_tokens:
                add(s.generated_tokens, at, float(usage.completion_tokens))
            if usage.prompt_tokens:
                s.cache_hit_ratio.observe(usage.cached_tokens / usage.prompt_tokens, tags={"model": model})
        if m is not None:
            s.ttft.observe(m.time_to_first_token_s, tags=mt)
            if usage is not None and usage.completion_tokens > 1:
                per_choice = usage.completion_tokens / max(1, job.engine_request.sampling.n)
                if per_choice > 1:
                    s.itl.observe((m.processing_time_s - m.time_to_first_token_s) / (per_choice - 1), tags=mt)

    def _record(self, life, job, model, tier, status, reason, usage, now, m) -> dict:
        rec = {
            "ts": time.time(),
            "event": "request",
            "request_id": job.engine_request.request_id if job is not None else None,
            "account": life.account,
            "model": model,
            "tier": tier,
            "stream": job.stream if job is not None else None,
            "status": status,
            "reason": reason or None,
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "cached_tokens": usage.cached_tokens if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0,
            "duration_s": round(now - life.started, 6),
            "gate_wait_s": round(life.slotted_at - life.queued_at, 6) if life.slotted_at else None,
            "replica": life.final.replica if life.final is not None else None,
            "trace_id": _trace_id(life),
        }
        if m is not None:
            rec["ttft_s"] = round(m.time_to_first_token_s, 6)
        if self.capture_content and life.prompt_body:
            rec["request_body"] = _text(life.prompt_body)
            rec["completion"] = _completion(life)
        return rec

    def _end_trace(self, life, job, status, reason, usage, now, record) -> None:
        root = self._root(life)
        if not root.is_recording():
            return
        from opentelemetry.trace import Status, StatusCode

        attrs: dict[str, Any] = {"ember.account": life.account, "http.response.status_code": status}
        if job is not None:
            sp = job.engine_request.sampling
            attrs.update({
                "gen_ai.operation.name": _operation(job), "gen_ai.system": "ember",
                "gen_ai.request.model": job.model.id, "gen_ai.response.model": job.model.id,
                "gen_ai.response.id": job.engine_request.request_id,
                "gen_ai.request.max_tokens": sp.max_tokens, "gen_ai.request.temperature": sp.temperature,
                "gen_ai.request.top_p": sp.top_p, "gen_ai.request.choice.count": sp.n,
                "ember.tier": job.billed_tier, "ember.stream": job.stream,
                "ember.session_key_set": bool(job.session),
            })
            if sp.seed is not None:
                attrs["gen_ai.request.seed"] = sp.seed
        if usage is not None:
            attrs.update({"gen_ai.usage.input_tokens": usage.prompt_tokens,
                          "gen_ai.usage.output_tokens": usage.completion_tokens,
                          "ember.usage.cached_tokens": usage.cached_tokens})
        if life.final is not None:
            reasons = [d.finish_reason for d in life.final.deltas if d.finish_reason]
            if reasons:
                attrs["gen_ai.response.finish_reasons"] = reasons
            if life.final.replica:
                attrs["ember.replica"] = life.final.replica
        if status == 429:
            attrs["ember.limited_reason"] = reason
        elif status == 503:
            attrs["ember.shed_reason"] = reason
        if status >= 400:
            attrs["error.type"] = reason or str(status)
        if self.capture_content and life.prompt_body:
            attrs["ember.request.body"] = _text(life.prompt_body)
            attrs["ember.response.text"] = _completion(life)
        root.set_attributes(attrs)
        if status >= 500 or (status >= 400 and status != CLIENT_CLOSED):
            root.set_status(Status(StatusCode.ERROR, reason or str(status)))
        root.end(end_time=life.span_offset_ns + int(now * 1e9))

    async def sample_forever(self, gates: dict, billing) -> None:
        """Gauges every ``sample_interval_s``: each gate's queues, slots taken and size; the
        outbox's backlog of usage events."""
        if self.metrics is None:
            return
        s = self.metrics
        while True:
            try:
                for model_id, gate in gates.items():
                    for tier, n in gate.queued_by_tier().items():
                        s.gate_queue.set(float(n), tags={"model": model_id, "tier": tier})
                    s.gate_in_flight.set(float(gate.in_flight), tags={"model": model_id})
                    s.gate_slots.set(float(gate.slots), tags={"model": model_id})
                s.ledger_backlog.set(float(billing.backlog()))
                s.counts.flush()  # the routers' counts, when no request has come for a while
            except Exception:
                log.debug("sampling gauges failed", exc_info=True)
            await asyncio.sleep(self.sample_interval_s)


CONTENT_LIMIT_BYTES = 4096


def _text(body: bytes) -> str:
    """The caller's request body (its messages or prompt), cut at ``CONTENT_LIMIT_BYTES``."""
    return body[:CONTENT_LIMIT_BYTES].decode("utf-8", "replace")


def _completion(life) -> list[str]:
    """Each choice's generated text so far (in choice order), each cut at ``CONTENT_LIMIT_BYTES``."""
    texts = life.completion_text or {}
    return [_text("".join(texts[i]).encode()) for i in sorted(texts)]


def _operation(job) -> str:
    return "chat" if "Chat" in type(job.renderer).__name__ else "text_completion"


def _trace_id(life) -> str | None:
    """The request's trace id: its root span's, or else the caller's traceparent's (logs join on it
    even when Ember does not trace)."""
    if life.span is not None:
        ctx = life.span.get_span_context()
        if ctx.trace_id:
            return f"{ctx.trace_id:032x}"
    tp = life.traceparent
    if tp and len(tp) >= 55 and tp[2] == "-":
        return tp[3:35]
    return None


# -- pool replicas -----------------------------------------------------------------------------------

class PoolTelemetry:
    """Per pool replica: the engine's gauges, and the replica and engine spans of traced requests."""

    def __init__(self, model: ModelConfig, obs: ObservabilityConfig, replica: str | None):
        self.model = model
        self.replica = replica or "local"
        self.metrics = _Series.get() if obs.metrics.enabled else None
        self.sample_interval_s = obs.metrics.sample_interval_s
        self.tracer = tracer(obs.tracing)

    async def sample_forever(self, load: Callable[[], tuple[int, int]]) -> None:
        if self.metrics is None:
            return
        s = self.metrics
        tags = {"model": self.model.id, "replica": self.replica}
        while True:
            try:
                running, waiting = load()
                s.running.set(float(running), tags=tags)
                s.waiting.set(float(waiting), tags=tags)
                s.capacity.set(float(self.model.engine.max_num_seqs), tags=tags)
            except Exception:
                log.debug("sampling pool gauges failed", exc_info=True)
            await asyncio.sleep(self.sample_interval_s)

    async def traced(self, request, stream):
        """``stream`` (the replica's outputs for ``request``), with its spans recorded at the end."""
        started = time.time_ns()
        first_ns: int | None = None
        final = None
        failed: BaseException | None = None
        try:
            async for out in stream:
                if first_ns is None and out.deltas:
                    first_ns = time.time_ns()
                if out.final:
                    final = out
                yield out
        except BaseException as exc:
            failed = exc
            raise
        finally:
            await stream.aclose()
            try:
                self._spans(request, started, time.time_ns(), first_ns, final, failed)
            except Exception:
                log.debug("recording replica spans failed", exc_info=True)

    def _spans(self, request, started: int, ended: int, first_ns, final, failed) -> None:
        from opentelemetry import trace as ot
        from opentelemetry.trace import Status, StatusCode

        tr = self.tracer
        rep = tr.start_span("ember.replica", context=_context_of(request.trace_context), kind=ot.SpanKind.SERVER,
                            start_time=started, attributes={"ember.replica": self.replica,
                                                            "gen_ai.request.model": self.model.id,
                                                            "ember.engine.kind": self.model.engine.kind})
        engine = tr.start_span("ember.engine", context=ot.set_span_in_context(rep), start_time=started)
        m = final.metrics if final is not None else None
        if m is not None:
            queue_ns = int((getattr(m, "queue_s", None) or 0.0) * 1e9)
            ttft_ns = started + int(m.time_to_first_token_s * 1e9)
            done_ns = started + int(m.processing_time_s * 1e9)
            if queue_ns:
                _child(tr, "ember.engine.queue", engine, started, started + queue_ns)
            _child(tr, "ember.engine.prefill", engine, started + queue_ns, ttft_ns)
            engine.add_event("first_token", timestamp=ttft_ns)
            _child(tr, "ember.engine.decode", engine, ttft_ns, done_ns)
        elif first_ns is not None:
            engine.add_event("first_token", timestamp=first_ns)
        if final is not None and final.usage is not None:
            u = final.usage
            engine.set_attributes({"gen_ai.usage.input_tokens": u.prompt_tokens,
                                   "gen_ai.usage.output_tokens": u.completion_tokens,
                                   "ember.usage.cached_tokens": u.cached_tokens})
        if failed is not None and not isinstance(failed, (asyncio.CancelledError, GeneratorExit)):
            rep.set_status(Status(StatusCode.ERROR, type(failed).__name__))
        elif final is None:
            rep.set_attribute("ember.cancelled", True)
        end = (started + int(m.processing_time_s * 1e9)) if m is not None else ended
        engine.end(end_time=max(end, started))
        rep.end(end_time=ended)


def configure_request_log(obs: ObservabilityConfig) -> None:
    """One JSON object per line, nothing around it: to ``<request_log_dir>/requests-<pid>.jsonl``,
    or to the process's stderr (Ray keeps it in the worker's log file)."""
    if not obs.request_log or getattr(request_log, "_ember_configured", False):
        return
    directory = obs.request_log_dir
    if directory:
        os.makedirs(directory, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(os.path.join(directory, f"requests-{os.getpid()}.jsonl"))
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    request_log.addHandler(handler)
    request_log.setLevel(logging.INFO)
    request_log.propagate = False
    request_log._ember_configured = True  # type: ignore[attr-defined]

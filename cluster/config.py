"""The one root config. It is validated once, in ``build_app``, before anything is built.

Validators do no network or disk I/O: a missing model directory is reported when the engine
starts, not here, so a config can be checked on a machine that does not hold the weights.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MODEL_ID_RE = re.compile(r"^accounts/[a-z0-9][a-z0-9-]*/(models|routers)/[a-z0-9][a-z0-9._-]*$")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEMO_MODEL_DIR = REPO_ROOT / "models" / "ember-demo"
DEFAULT_DEMO_EMBED_MODEL_DIR = REPO_ROOT / "models" / "ember-demo-embed"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SimLatencyConfig(_Strict):
    """SimEngine's latency model, in seconds.

    One scheduler step costs ``step_base_s + decode_s_per_seq * running`` plus, for each request
    admitted in that step, ``prefill_base_s + prefill_s_per_token * uncached_prompt_tokens``.
    Zeros give an engine that only yields to the event loop, which is what gateway benchmarks want.
    """

    step_base_s: float = Field(0.0, ge=0)
    decode_s_per_seq: float = Field(0.0, ge=0)
    prefill_base_s: float = Field(0.0, ge=0)
    prefill_s_per_token: float = Field(0.0, ge=0)


class EngineConfig(_Strict):
    kind: Literal["vllm", "sim"] = "sim"
    block_size: int = Field(32, ge=1, le=1024)
    max_num_seqs: int = Field(16, ge=1, le=4096)
    # Sequences the engine may run beyond max_num_seqs, as a share of it (rounded up). When every
    # slot is taken, the ingress hands them only to an account that wants less than another
    # holds (its max-min fair share), so a quiet account is not left waiting for a noisy one's
    # requests to end (ingress.queue_order vtc; policies/fair_share.py). max_num_seqs stays the
    # pool's capacity for everything else (slots, autoscaling, batch). 0: none.
    fair_share_headroom: float = Field(0.25, ge=0, le=1)
    # SimEngine: prefix-cache capacity in tokens. vLLM sizes its cache from memory instead.
    cache_capacity_tokens: int = Field(1 << 16, ge=1)
    latency: SimLatencyConfig = SimLatencyConfig()
    # Streams leave the replica as one message per this interval (the first token at once): each
    # Serve message costs far more than a token. 0 sends whatever is ready.
    stream_interval_s: float = Field(0.05, ge=0, le=1)
    # ... at least; with many streams the replica's streams share this many messages a second,
    # each stream's interval growing up to stream_max_interval_s (policies/streaming.py).
    stream_messages_per_s: float = Field(100, gt=0)
    stream_max_interval_s: float = Field(0.25, ge=0, le=2)
    # vLLM only.
    enforce_eager: bool = True
    dtype: str = "auto"
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    cpu_kvcache_space_gib: float = Field(1.0, gt=0)
    # vLLM on CPU: threads for the model's kernels (OMP_NUM_THREADS). Ray would otherwise set it
    # to the replica's num_cpus (1 for fractional CPUs), which halves throughput on 2 cores.
    cpu_threads: int | None = Field(None, ge=1, le=512)
    seed: int = 0
    # vLLM's structured-output backend (JSON schemas, grammars, forced tool calls): guidance
    # (llguidance) or xgrammar. Ember asks for compact JSON (no free whitespace between tokens), which
    # vLLM offers for these two only (not for "auto"): fewer tokens, and a weak model cannot pad
    # its answer with whitespace until max_tokens. guidance is the default: xgrammar 0.2.8 compiles
    # a string with maxLength to a character class that admits raw control characters, which JSON
    # forbids (6% of the structured benchmark's answers did not parse). With guidance, an object
    # without "additionalProperties" takes no properties beyond its own, as with xgrammar.
    structured_output_backend: Literal["xgrammar", "guidance"] = "guidance"

    @property
    def fair_share_seqs(self) -> int:
        """Sequences a replica runs beyond ``max_num_seqs`` for accounts under their fair share."""
        return math.ceil(self.max_num_seqs * self.fair_share_headroom - 1e-9)

    @property
    def engine_max_num_seqs(self) -> int:
        """What the engine itself is told: ``max_num_seqs`` plus the fair-share headroom."""
        return self.max_num_seqs + self.fair_share_seqs

    @model_validator(mode="after")
    def _vllm_cpu_block_size(self) -> "EngineConfig":
        if self.kind == "vllm" and self.block_size % 16:
            raise ValueError("vllm block_size must be a multiple of 16 (32 on CPU)")
        return self


class AutoscalingConfig(_Strict):
    """Replica bounds and the autoscaling policy (deployments/autoscaling.py, policies/autoscale.py).

    ``policy: ember`` (pools; the default) scales on Ember's metrics: the sequences each replica
    runs and queues plus the requests held at the ingress gates; ``target_utilization``,
    ``upscale_window_s``, ``hysteresis``, ``downscale_delay_s``, ``downscale_step_interval_s`` and
    ``idle_to_zero_s``
    are its knobs (``policies.autoscale.Knobs``) and Serve's own delays are 0. ``policy: serve``
    is Serve's default (``target_ongoing_requests`` with ``upscale_delay_s`` /
    ``downscale_delay_s``), the baseline; the ingress always uses it.

    The ingress gate in front of an autoscaled pool sizes its slots from the pool's running
    replicas (``gate_follows_replicas``; off: fixed at the starting size, the old behaviour).
    While the pool is below ``max_replicas`` requests wait for new replicas up to
    ``replica_start_s`` (about how long a replica takes to start) before being refused; a pool
    scaled to zero holds requests up to ``cold_start_hold_s`` for its first replica, then answers
    503 with a Retry-After of the start time still expected.
    """

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(8, gt=0)
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(300, ge=0)
    policy: Literal["ember", "serve"] = "ember"
    target_utilization: float = Field(0.8, gt=0, le=1)
    hysteresis: float = Field(0.15, ge=0, lt=1)
    upscale_window_s: float = Field(2.0, ge=0, le=60)
    downscale_step_interval_s: float = Field(10, ge=0)
    idle_to_zero_s: float = Field(300, ge=0)
    metrics_interval_s: float = Field(1.0, gt=0, le=60)
    look_back_period_s: float = Field(5.0, gt=0, le=600)
    gate_follows_replicas: bool = True
    replica_start_s: float = Field(30.0, ge=0, le=3600)
    cold_start_hold_s: float = Field(60.0, ge=0, le=3600)

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must lie within [min_replicas, max_replicas]")
        return self

    def knobs(self) -> dict:
        """``policies.autoscale.Knobs`` as policy_kwargs."""
        return {"target_utilization": self.target_utilization, "hysteresis": self.hysteresis,
                "upscale_window_s": self.upscale_window_s, "downscale_delay_s": self.downscale_delay_s,
                "downscale_step_interval_s": self.downscale_step_interval_s,
                "idle_to_zero_s": self.idle_to_zero_s}

    @property
    def starting_replicas(self) -> int:
        return self.initial_replicas if self.initial_replicas is not None else self.min_replicas

    def to_serve(self) -> dict:
        """Serve's ``autoscaling_config`` under Serve's default policy (``policy: serve``)."""
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "initial_replicas": self.initial_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }


class RoutingConfig(_Strict):
    """How the ingress picks a replica of a model pool.

    ``affinity`` is Ember's consistent hashing with bounded loads on the session key. The others
    are baselines for benchmarks: Serve's default ``power_of_two``, Ray's experimental
    ``ray_consistent_hash`` (no load bound) and ``round_robin``.
    """

    policy: Literal["affinity", "power_of_two", "ray_consistent_hash", "round_robin"] = "affinity"
    load_factor: float = Field(1.25, ge=1, le=10)
    vnodes: int = Field(100, ge=1, le=1000)
    # Account homes: how many replicas an account's sessions share before any alternate, so that
    # what they have in common (a long system prompt) is cached on that many replicas, not on all.
    # Helps with many accounts of similar traffic; a few hot accounts crowd their homes instead.
    # None (the default): every session hashes over the whole pool.
    account_replicas: int | None = Field(None, ge=1, le=1000)
    # Delay scheduling: how long a request whose owner is at the load cap may wait for it before
    # going to an alternate, where it would find none of its cached prefix. 0: move at once.
    owner_wait_ms: float = Field(200.0, ge=0, le=5000)
    # How long an ingress trusts a replica's report of the other ingresses' requests on it (sent
    # with every request it accepts); after that only its own in-flight requests count.
    peer_load_ttl_s: float = Field(1.0, gt=0, le=60)


class TokenBudgets(_Strict):
    """Tokens per minute for each rate-limit budget."""

    prompt: int = Field(ge=1)
    uncached: int = Field(ge=1)
    generated: int = Field(ge=1)


class LimitBounds(_Strict):
    """Explicit per-minute floor and tier-1 ceiling for a model, instead of its size class's."""

    floor: TokenBudgets
    ceiling: TokenBudgets

    @model_validator(mode="after")
    def _order(self) -> "LimitBounds":
        for b in ("prompt", "uncached", "generated"):
            if getattr(self.floor, b) > getattr(self.ceiling, b):
                raise ValueError(f"floor.{b} must be <= ceiling.{b}")
        return self


class PriceRow(_Strict):
    """USD per 1M tokens. Cached input defaults to half of input."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(None, ge=0)

    @property
    def cached(self) -> float:
        return self.input * 0.5 if self.cached_input is None else self.cached_input


class EmbeddingPriceRow(_Strict):
    """USD per 1M input tokens of an embedding model (there is no output, and no cache discount)."""

    input: float = Field(ge=0)


class PricingConfig(_Strict):
    standard: PriceRow = PriceRow(input=0.20, output=0.20)
    # What an embedding model (task: embed) bills instead of `standard`.
    embedding: EmbeddingPriceRow = EmbeddingPriceRow(input=0.02)
    # Priority's own row; None means the model offers no Priority tier (service_tier=priority → 400).
    priority: PriceRow | None = None
    batch_discount: float = Field(0.5, gt=0, le=1)


MIN_DEPRECATION_NOTICE = dt.timedelta(days=14)


class LifecycleConfig(_Strict):
    status: Literal["active", "deprecated", "removed"] = "active"
    deprecated_on: dt.date | None = None  # the day the deprecation was announced
    removal_date: dt.date | None = None
    replacement: str | None = None

    @model_validator(mode="after")
    def _notice(self) -> "LifecycleConfig":
        if self.status in ("deprecated", "removed"):
            if self.deprecated_on is None or self.removal_date is None:
                raise ValueError(f"a {self.status} model needs deprecated_on and removal_date")
        if self.deprecated_on and self.removal_date:
            if self.removal_date - self.deprecated_on < MIN_DEPRECATION_NOTICE:
                raise ValueError(
                    f"removal_date {self.removal_date} is less than 14 days after the deprecation "
                    f"notice of {self.deprecated_on}")
        return self


class ReplicaResources(_Strict):
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)

    def to_serve(self) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


class EmbeddingConfig(_Strict):
    """What a pool with ``task: embed`` serves (``POST /v1/embeddings``).

    ``dimensions`` is the model's vector size (the engine checks it at start). With ``matryoshka``
    the model was trained so that a vector's leading components are an embedding of their own, and
    a request's ``dimensions`` (1..dimensions) truncates each vector and normalises it again;
    without it, ``dimensions`` in a request is a 400.
    """

    dimensions: int = Field(ge=1, le=65536)
    matryoshka: bool = False
    max_inputs: int = Field(256, ge=1, le=2048)  # inputs per request (OpenAI allows 2048)


class ModelConfig(_Strict):
    id: str
    # "generate": chat and completions. "embed": /v1/embeddings only, served by vLLM's pooling
    # runner (SimEngine: deterministic vectors); it needs `embedding`.
    task: Literal["generate", "embed"] = "generate"
    embedding: EmbeddingConfig | None = None
    # A model directory (config.json, weights, tokenizer). None means the locally built demo model.
    path: str | None = None
    context_length: int = Field(2048, ge=16)
    engine: EngineConfig = EngineConfig()
    # Either a fixed replica count or autoscaling bounds.
    num_replicas: int | None = Field(None, ge=1)
    autoscaling: AutoscalingConfig | None = None
    resources: ReplicaResources = ReplicaResources()
    routing: RoutingConfig = RoutingConfig()
    # Parameter count, which sets the size class of its rate limits (small < 400B < medium < 1.6T).
    params_billions: float = Field(1.0, gt=0)
    limits: LimitBounds | None = None
    pricing: PricingConfig = PricingConfig()
    lifecycle: LifecycleConfig = LifecycleConfig()
    max_ongoing_requests: int = Field(256, ge=1)
    # How long a replica being stopped (scale-down, redeploy) may keep serving its streams before
    # Serve kills it. It takes no new requests meanwhile and leaves as soon as its last stream
    # ends, so a long bound costs nothing when streams are short. None: the ingress's
    # request_timeout_s (600 s by default), which bounds a request's wait for its first output;
    # raise it if streams may run longer than that.
    graceful_shutdown_timeout_s: float | None = Field(None, gt=0)
    owned_by: str | None = None
    # How the model writes tool calls, named as vLLM names its parsers (vllm serve
    # --tool-call-parser); the chat template must render `tools`. None: requests with tools are
    # refused (400 naming `tools`). Ember's parsers: deployments/tool_calls.py.
    tool_call_parser: Literal["hermes"] | None = None
    # Who may list and call it: a model is private to its owning account (the <owner> in its id)
    # unless public. None: public when the platform account owns it (auth.platform_account).
    public: bool | None = None

    @field_validator("id")
    @classmethod
    def _id_shape(cls, v: str) -> str:
        if not MODEL_ID_RE.match(v):
            raise ValueError(
                f"model id {v!r} must look like accounts/<owner>/models/<slug> "
                "or accounts/<owner>/routers/<slug>-fast"
            )
        return v

    @model_validator(mode="after")
    def _scaling(self) -> "ModelConfig":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set num_replicas or autoscaling, not both")
        if (self.task == "embed") != (self.embedding is not None):
            raise ValueError("a model with task: embed needs `embedding` (and only such a model has it)")
        if self.task == "embed" and self.pricing.priority is not None:
            raise ValueError("an embedding model offers no Priority tier (pricing.priority)")
        return self

    @property
    def served(self) -> bool:
        """Removed models keep their config (for the 404 that names the replacement) but no pool."""
        return self.lifecycle.status != "removed"

    @property
    def owner(self) -> str:
        return self.owned_by or self.id.split("/")[1]

    @property
    def model_dir(self) -> Path:
        if self.path:
            return Path(self.path).expanduser()
        return demo_embed_model_dir() if self.task == "embed" else demo_model_dir()

    @property
    def deployment_name(self) -> str:
        # Serve deployment names may not hold '/'.
        return "pool-" + self.id.split("/", 1)[1].replace("/", "-")


class TokenWeightsConfig(_Strict):
    """What one prompt token and one generated token weigh in the fair-share counters."""

    input: float = Field(1.0, ge=0)
    output: float = Field(2.0, ge=0)


class IngressConfig(_Strict):
    num_replicas: int | None = Field(1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    max_ongoing_requests: int = Field(512, ge=1)
    num_cpus: float = Field(0.5, ge=0)
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024)
    # The whole body must arrive within this many seconds of the headers (408 otherwise), so a
    # slow sender cannot hold an ingress slot.
    body_read_timeout_s: float = Field(10.0, gt=0)
    # Requests of one account in this ingress replica at once, counted before the body is read:
    # one tenant cannot fill the replica's max_ongoing_requests for everyone (429 beyond it).
    max_concurrent_per_account: int = Field(64, ge=1)
    # Large bodies (64 KiB and more) that an account sent and that failed validation: at this many
    # within the window the account is refused (429) until the oldest leaves it, and Serve's proxy
    # refuses it too, before reading its bodies (deployments/proxy_guard.py). Each such body costs
    # the replica's event loop ~20-40 ms (a 2 MiB one): 4 a minute keep a flood's cost to other
    # tenants below their p99 (abuse benchmark).
    failed_large_limit: int = Field(4, ge=1)
    failed_large_window_s: float = Field(60.0, gt=0)
    # Reads of /v1/usage per account and minute (they hit the store).
    usage_requests_per_minute: int = Field(60, ge=1)
    # Upper bound on max_tokens a caller may ask for, whatever the context allows.
    max_completion_tokens: int = Field(4096, ge=1)
    max_n: int = Field(8, ge=1)
    # Until a request's first output (non-streamed: its whole answer) arrives from the pool: 504.
    request_timeout_s: float = Field(600, gt=0)
    # A stream that has started ends with an error event if no output comes for this long.
    stream_idle_timeout_s: float = Field(30, gt=0)
    access_log: bool = True  # Serve's per-request log lines; benchmarks turn them off
    # Tiers and load shedding (policies/tiers.py): Standard runs in all but `priority_reserve` of
    # a pool's slots and is refused (503) once it would queue longer than `max_queue_wait_s`;
    # Priority may use every slot and `priority_headroom` times the wait.
    max_queue_wait_s: float = Field(2.0, ge=0)
    priority_headroom: float = Field(4.0, ge=1)
    priority_reserve: float = Field(0.25, ge=0, lt=1)
    # How each tier's waiting requests are ordered at a pool's gate (policies/fair_share.py):
    # "vtc" by the weighted tokens each account has been served (the least served first), "fcfs"
    # by arrival. The weights price a prompt and a generated token in the counters.
    queue_order: Literal["vtc", "fcfs"] = "vtc"
    fair_share_weights: TokenWeightsConfig = TokenWeightsConfig()

    @model_validator(mode="after")
    def _scaling(self) -> "IngressConfig":
        if self.autoscaling is not None:
            return self.model_copy(update={"num_replicas": None})
        return self


class AuthConfig(_Strict):
    """API keys, the demo key and the admin API (deployments/auth.py, deployments/admin.py).

    Failed attempts are counted per source: the client address Serve's proxy puts in the request
    (the TCP peer; uvicorn replaces it with the last untrusted X-Forwarded-For entry only when the
    peer is in ``FORWARDED_ALLOW_IPS`` on the proxy, by default 127.0.0.1 and ::1).
    """

    # The demo key's account: created when the app starts, reserved (POST /admin/accounts → 409).
    demo_account: str = Field("demo", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    # The demo key is read from this environment variable when the app is built; only its hash is
    # kept. It becomes an ordinary, revocable key of the demo account. If the variable is unset,
    # no demo key exists, and one seeded by an earlier start is removed from the store.
    demo_key_env: str = "EMBER_DEMO_KEY"
    # Likewise the admin API's token; unset, the admin API is off.
    admin_token_env: str = "EMBER_ADMIN_TOKEN"
    # The account that owns the platform's own models (accounts/<it>/models/...): those are public
    # unless a model says otherwise (ModelConfig.public); other owners' models are private to them.
    platform_account: str = "ember"

    # A verified key is cached by each ingress replica for `key_cache_ttl_s`, as long as the
    # replica's revocation feed (Redis pub/sub) is live; otherwise for `revocation_max_delay_s`.
    # A revoked key stops working everywhere within `revocation_max_delay_s`.
    key_cache_ttl_s: float = Field(30.0, gt=0, le=3600)
    revocation_max_delay_s: float = Field(1.0, gt=0, le=60)
    key_cache_size: int = Field(100_000, ge=1)
    # Unknown keys are remembered for this long (0: not at all), so a repeated bad key costs no
    # store read.
    unknown_key_cache_ttl_s: float = Field(2.0, ge=0, le=60)
    unknown_key_cache_size: int = Field(10_000, ge=1)
    # After `failed_auth_limit` bad keys from one source within `failed_auth_window_s`, its
    # requests get 429 (code too_many_auth_failures, with Retry-After) until the window allows more.
    failed_auth_limit: int = Field(20, ge=1)
    failed_auth_window_s: float = Field(10.0, gt=0, le=3600)
    failed_auth_sources: int = Field(10_000, ge=1)  # sources tracked per replica (least recent go)
    # While the key store is unreachable, a key this replica verified within this many seconds
    # keeps working (no revocation can reach the store meanwhile); 0: 503 at once (fail closed).
    store_outage_grace_s: float = Field(300.0, ge=0)

    # The admin API: off entirely with admin_enabled false (its routes do not exist), or moved to
    # another path prefix. Failed admin tokens are throttled per source like API keys.
    admin_enabled: bool = True
    admin_prefix: str = "/admin/"
    admin_failed_limit: int = Field(10, ge=1)
    admin_failed_window_s: float = Field(60.0, gt=0, le=3600)

    @field_validator("admin_prefix")
    @classmethod
    def _admin_prefix(cls, v: str) -> str:
        if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+/", v):
            raise ValueError("admin_prefix must look like /segment/ or /a/b/ (starting and ending with '/')")
        for taken in ("/v1/", "/inference/", "/openapi.json"):
            if v.startswith(taken) or taken.startswith(v):
                raise ValueError(f"admin_prefix {v!r} overlaps the API route {taken!r}")
        return v


class RampConfig(_Strict):
    """See policies/rate_limit.py for what each parameter does."""

    headroom: float = Field(2.0, gt=1)
    usage_tau_s: float = Field(300, gt=0)
    idle_decay_tau_s: float = Field(600, gt=0)
    max_doubling_s: float = Field(1200, gt=0)


class RateLimitConfig(_Strict):
    enabled: bool = True
    # Limiter actors; accounts are spread over them by a stable hash.
    shards: int = Field(1, ge=1, le=64)
    # Each ingress replica leases this fraction of a limit at a time, so most requests are
    # admitted locally without a round trip; unused leases go back after `lease_idle_s`.
    lease_fraction: float = Field(0.02, gt=0, le=0.5)
    lease_idle_s: float = Field(1.0, gt=0)
    requests_per_minute: int = Field(6000, ge=1)  # fixed account-wide cap
    # When the store (Redis) is unreachable: "open" keeps limiting from the actor's memory, serves
    # accounts from what the ingress last saw and queues usage events until the store is back;
    # "closed" refuses requests with 503.
    on_store_error: Literal["open", "closed"] = "open"
    ramp: RampConfig = RampConfig()
    default_spend_tier: int = Field(1, ge=1, le=5)


class StoreConfig(_Strict):
    url: str = "memory://"
    # Usage events are written here (SQLite, WAL) before a response ends and drained into the
    # ledger in the background, so an ingress crash or a store outage delays billing but never
    # loses it. Shared by the ingress replicas of one node. None: a folder under the temp dir.
    outbox_dir: str | None = None
    # How long a stored response (POST /v1/responses with store: true) stays readable by its
    # owner and usable as previous_response_id. OpenAI keeps them 30 days.
    response_ttl_s: float = Field(30 * 24 * 3600, gt=0)

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not (v == "memory://" or v.startswith(("redis://", "rediss://", "unix://"))):
            raise ValueError("store url must be memory:// or redis://host:port/db")
        return v


class MetricsConfig(_Strict):
    """Prometheus series (``ember_*``) through Ray's metrics (``ray.util.metrics``): every process
    reports to its node's metrics agent, exported at the node's metrics export port (8080 under
    ``make run``) with Ray's ``ray_`` prefix (see deployments/telemetry.py)."""

    enabled: bool = True
    # Accounts named in labels: the top N by recent traffic; every other account is "other"
    # (policies/cardinality.py). 0: no account label values but "other".
    top_accounts: int = Field(20, ge=0, le=1000)
    account_half_life_s: float = Field(600.0, gt=0)  # how fast past traffic stops counting
    account_refresh_s: float = Field(60.0, gt=0)  # how often the top N is recomputed
    sample_interval_s: float = Field(2.0, gt=0, le=60)  # gauges (gate queues, ledger backlog)


class TracingConfig(_Strict):
    """OpenTelemetry traces, one per request (deployments/telemetry.py).

    ``exporter``: ``none`` (the default: no span is ever created), ``otlp`` (the endpoint, headers
    and protocol from the standard ``OTEL_EXPORTER_OTLP_*`` variables), ``console`` (stdout of each
    Ray process), or ``file`` (JSON lines under ``file_dir``, one file per process). Unset, it is
    read from ``OTEL_TRACES_EXPORTER`` (``none`` if that is unset too). ``sample_ratio`` applies to
    requests without a sampled parent (a caller's sampled ``traceparent`` is always followed);
    unset, ``OTEL_TRACES_SAMPLER_ARG`` or 1.0.
    """

    exporter: Literal["none", "otlp", "console", "file"] | None = None
    sample_ratio: float | None = Field(None, ge=0, le=1)
    file_dir: str | None = None
    service_name: str = "ember"


class ObservabilityConfig(_Strict):
    metrics: MetricsConfig = MetricsConfig()
    tracing: TracingConfig = TracingConfig()
    # One JSON line per generation request: to <request_log_dir>/requests-<pid>.jsonl, or with no
    # directory to the process's stderr (which Ray keeps in the replica's worker log).
    request_log: bool = True
    request_log_dir: str | None = None
    # The caller's request body (messages or prompt, first 4 KiB) and each choice's generated text
    # (first 4 KiB each) in the root span and the request log line. Off unless an operator turns
    # it on.
    capture_content: bool = False
class BatchConfig(_Strict):
    """The Files and Batches API and its runner (deployments/batch_api.py, deployments/batch_runner.py).

    File bytes live under ``blob_url``: a local directory (the default: ``<tmp>/ember-blobs``) or
    any fsspec URL (``s3://bucket/prefix``) that every ingress replica and the runner can reach.
    Metadata (files, batches and per-line results) lives in ``store.url``. With
    ``memory://`` the runner runs inside the (single) ingress replica; with Redis it is a Serve
    deployment of its own that resumes from the store after any restart.
    """

    enabled: bool = True
    blob_url: str | None = None
    # OpenAI's limits on a batch input file.
    max_file_bytes: int = Field(200 * 1024 * 1024, ge=1024)
    max_lines: int = Field(50_000, ge=1)
    completion_window_s: float = Field(24 * 3600, gt=0)
    # Adaptive concurrency: lines in flight start at `start_concurrency`, grow by one per window of
    # successes while the pool has idle slots, halve when interactive requests queue or a slot is
    # refused; never above `max_concurrency` (per runner).
    start_concurrency: int = Field(2, ge=1)
    max_concurrency: int = Field(64, ge=1)
    # The share of a pool gate's slots batch lines leave free (policies.tiers.usable_slots). An
    # interactive request that finds no free slot takes one back from the batch line that
    # started last (it is stopped, unbilled, and runs again later), so none is needed for them
    # to start at once; a share kept free saves them that abort, at that share of batch throughput.
    headroom: float = Field(0.0, ge=0, lt=1)
    # A line whose attempts all died with their replica or ingress fails after this many.
    max_attempts: int = Field(3, ge=1)
    poll_interval_s: float = Field(0.5, gt=0, le=60)
    # How long the runner waits before retrying a refused (busy) line, at most.
    busy_backoff_s: float = Field(0.2, gt=0, le=60)
    # Lines the runner sends to an ingress in one call (run at once there): fewer calls, less
    # per-line handling in the runner and the ingress.
    lines_per_call: int = Field(4, ge=1, le=64)
    # Batch runs on idle capacity (policies.batch.Pacer): it fills the pool (up to the window)
    # only once no interactive request has held a slot for `quiet_s`; while they run, at most
    # one line is in flight, started at most every `trickle_s`, so a batch still moves on a pool
    # that is never idle. `yield_to_interactive: false` runs the window beside them instead.
    yield_to_interactive: bool = True
    quiet_s: float = Field(1.0, ge=0, le=600)
    trickle_s: float = Field(1.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _window(self) -> "BatchConfig":
        if self.start_concurrency > self.max_concurrency:
            raise ValueError("start_concurrency must be <= max_concurrency")
        return self


class EmberConfig(_Strict):
    models: list[ModelConfig] = Field(min_length=1)
    ingress: IngressConfig = IngressConfig()
    auth: AuthConfig = AuthConfig()
    store: StoreConfig = StoreConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()
    observability: ObservabilityConfig = ObservabilityConfig()
    batch: BatchConfig = BatchConfig()

    @model_validator(mode="after")
    def _unique_ids(self) -> "EmberConfig":
        seen: set[str] = set()
        for m in self.models:
            if m.id in seen:
                raise ValueError(f"model id {m.id!r} appears twice")
            seen.add(m.id)
        for m in self.models:
            repl = m.lifecycle.replacement
            if repl is not None and (self.model(repl) is None or not self.model(repl).served):
                raise ValueError(f"model {m.id!r}: replacement {repl!r} is not a served model in this config")
        if not any(m.served for m in self.models):
            raise ValueError("at least one model must be served (not removed)")
        ing = self.ingress
        if self.store.url == "memory://" and (ing.autoscaling is not None or (ing.num_replicas or 1) > 1):
            raise ValueError("store memory:// lives in one ingress replica (keys, revocations, the ledger): "
                             "use redis:// for more than one ingress replica")
        return self

    def is_visible(self, model: ModelConfig, account: str) -> bool:
        """Whether ``account`` may list and call ``model``: its owner always, others if public."""
        public = model.public if model.public is not None else model.owner == self.auth.platform_account
        return public or account == model.owner

    def model(self, model_id: str) -> ModelConfig | None:
        for m in self.models:
            if m.id == model_id:
                return m
        return None


def demo_model_dir() -> Path:
    return Path(os.environ.get("EMBER_DEMO_MODEL_DIR", DEFAULT_DEMO_MODEL_DIR))


def demo_embed_model_dir() -> Path:
    return Path(os.environ.get("EMBER_DEMO_EMBED_MODEL_DIR", DEFAULT_DEMO_EMBED_MODEL_DIR))

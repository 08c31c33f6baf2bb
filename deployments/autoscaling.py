"""Ember's autoscaling on Ray Serve 2.60: the adapter between Serve's policy API and policies/autoscale.py.

Design note
-----------
*What Ray 2.60 offers* (paths under ``ray/serve/``; ``_p/`` is ``_private/``):

- A custom policy is ``AutoscalingPolicy(policy_function="module:attr", policy_kwargs={...})``
  (config.py:425-546). If ``attr`` is a class, the controller instantiates it once with
  ``policy_kwargs`` and calls the instance each tick (_p/autoscaling_state.py:61-78); a plain
  function gets no kwargs. The controller ticks every 0.1 s (_p/constants.py:77,
  _p/controller.py:638).
- Deployment level: ``autoscaling_config={"policy": {...}}``, called as ``policy(ctx) ->
  (replicas, state)``. Application level: ``autoscaling_policy:`` on an application in a Serve
  config file (schema.py:862; ``serve.run`` has no such option), called as
  ``policy({DeploymentID: ctx}) -> ({DeploymentID: replicas}, {DeploymentID: state})``, with a
  context for every deployment of the app **that has an autoscaling_config**
  (_p/autoscaling_state.py:1172-1182, _p/deployment_state.py:3801-3806). A deployment left out of
  the returned dict keeps its target (autoscaling_policy.py:305-310, _p/application_state.py:576-588).
- Both kinds are wrapped (autoscaling_policy.py:235-331): Ray still applies, per deployment, the
  up/downscaling factors and ``upscale_delay_s`` / ``downscale_delay_s`` /
  ``downscale_to_zero_delay_s`` (defaults 30 s / 600 s / none), then min/max
  (_p/autoscaling_state.py:1218-1226). Ember's policy keeps its own time, so pools run with those
  delays at 0 and no factors (``pool_autoscaling_config``). While a deployment has 0 *running*
  replicas and Serve counts requests for it, Ray's cold-start path decides instead of the policy
  (autoscaling_policy.py:222-232, 250-253, 311-320).
- Custom metrics: a method ``record_autoscaling_stats(self) -> dict[str, int | float]`` on the
  deployment class (sync or async, 10 s timeout, types checked on the first call) is sampled
  every ``min(look_back_period_s × 0.2, metrics_interval_s)`` and pushed every
  ``metrics_interval_s`` (default 10 s), only on deployments with an autoscaling_config
  (_p/replica.py:689-711, 765-775, 1003-1073, 4106, 4178-4210). The policy reads them as
  ``ctx.raw_metrics[name][replica_id]`` (the series) or ``ctx.aggregated_metrics`` (the window
  aggregate) (_p/autoscaling_state.py:996-1036).
- ``ctx.total_queued_requests`` counts requests waiting *inside Serve's handles* for a replica
  (_p/router.py:267-285, 1041), not those Ember's ingress gates hold before calling the handle.
- A stopped replica drains: no new requests reach it; it checks every
  ``graceful_shutdown_wait_loop_s`` (2 s) until nothing is ongoing and is killed after
  ``graceful_shutdown_timeout_s`` (20 s default) regardless (_p/replica.py:2067-2110, 2192-2222;
  _p/deployment_state.py:1581-1620, 2167-2200). That timeout must exceed the longest stream, or
  a scale-down cuts it.

*Integration.* The app-level policy ``EmberAppPolicy`` sees every deployment's custom metrics,
so the ingress's per-pool, per-tier queue depth and the pools' running sequences meet in one
call, which also enforces a replica budget across models. Pools are the deployments named
``pool-…`` (``ModelConfig.deployment_name``); any other deployment (the ingress) is scaled by
Ray's default policy. ``EmberPoolPolicy`` is the deployment-level fallback for apps started with
``serve.run`` (no app-level policy there): it sees its own replicas and Serve's handle queue, but
not the ingress gates' queues and no budget.

Metrics, reported by ``record_autoscaling_stats`` (use the helpers below, all keys every time):

- each pool replica: ``ember_running_seqs`` (sequences the engine runs), ``ember_waiting_seqs``
  (the engine's waiting queue), ``ember_capacity_seqs`` (its live ``max_num_seqs``);
- each ingress replica: ``ember_queued::<pool deployment name>::<tier>`` for every pool and tier
  (priority, standard, batch): requests its gate holds for that pool, zeros included. The
  ingress must have an ``autoscaling_config`` (min = max is fine) or nothing it reports arrives.

Config, in ``serve run`` YAML (app level)::

    applications:
      - name: ember
        import_path: cluster.builder:build_app
        autoscaling_policy:
          policy_function: deployments.autoscaling:EmberAppPolicy
          policy_kwargs: {max_total_replicas: 8, target_utilization: 0.8}

with each pool's ``autoscaling_config=pool_autoscaling_config(min, max)`` and the ingress's
``autoscaling_config=ingress_autoscaling_config(n, n)``. The controller unpickles the policy by
reference to ``policies.autoscale``, so the ember package must be importable where the Serve
controller runs (it is when installed in the cluster's environment, as ``make run`` does).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Dict, Mapping, Optional, Tuple

from deployments.telemetry import record_autoscaling
from policies.autoscale import TIERS, Decision, Knobs, Snapshot, State, decide, decide_all

log = logging.getLogger("ember.autoscaling")

METRIC_RUNNING = "ember_running_seqs"
METRIC_WAITING = "ember_waiting_seqs"
METRIC_CAPACITY = "ember_capacity_seqs"
QUEUED_PREFIX = "ember_queued::"
STATE_KEY = "ember"
POOL_PREFIX = "pool-"
POLICY_APP = "deployments.autoscaling:EmberAppPolicy"
POLICY_POOL = "deployments.autoscaling:EmberPoolPolicy"
DEFAULT_CAPACITY_SEQS = 16.0  # EngineConfig.max_num_seqs's default, when nothing says otherwise


# -- what each side reports -------------------------------------------------------------------


def queued_metric(pool_deployment: str, tier: str) -> str:
    """``ember_queued::<pool deployment name>::<tier>``."""
    return f"{QUEUED_PREFIX}{pool_deployment}::{tier}"


def pool_stats(running_seqs: float, waiting_seqs: float, capacity_seqs: float) -> dict[str, float]:
    """What a pool replica's ``record_autoscaling_stats`` returns."""
    return {METRIC_RUNNING: float(running_seqs), METRIC_WAITING: float(waiting_seqs),
            METRIC_CAPACITY: float(capacity_seqs)}


def ingress_stats(queued: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """What an ingress replica's ``record_autoscaling_stats`` returns, from
    ``{pool deployment name: {tier: requests held at its gate}}``; every tier is reported."""
    return {queued_metric(pool, tier): float(by_tier.get(tier, 0))
            for pool, by_tier in queued.items() for tier in TIERS}


def pool_autoscaling_config(min_replicas: int = 1, max_replicas: int = 1,
                            initial_replicas: Optional[int] = None, *, metrics_interval_s: float = 1.0,
                            look_back_period_s: float = 5.0, policy: Optional[str] = POLICY_POOL,
                            policy_kwargs: Optional[Dict[str, Any]] = None) -> dict[str, Any]:
    """A pool's Serve ``autoscaling_config`` under Ember's policy.

    Ray's own delays are 0 (the policy times itself) and metrics arrive every second (Serve's
    default 10 s would spend most of a 15 s reaction budget). ``policy`` is the deployment-level
    ``EmberPoolPolicy`` unless None; an app-level ``EmberAppPolicy`` overrides it (Serve logs a
    warning when both are set).
    """
    cfg: dict[str, Any] = {
        "min_replicas": min_replicas, "max_replicas": max_replicas,
        "initial_replicas": initial_replicas,
        "upscale_delay_s": 0.0, "downscale_delay_s": 0.0, "downscale_to_zero_delay_s": 0.0,
        "metrics_interval_s": metrics_interval_s, "look_back_period_s": look_back_period_s,
    }
    if policy is not None:
        cfg["policy"] = {"policy_function": policy, "policy_kwargs": dict(policy_kwargs or {})}
    return cfg


def ingress_autoscaling_config(min_replicas: int = 1, max_replicas: int = 1, *,
                               metrics_interval_s: float = 1.0, look_back_period_s: float = 5.0,
                               **serve_options: Any) -> dict[str, Any]:
    """The ingress's ``autoscaling_config``: needed even at a fixed size (min = max), since only an
    autoscaled deployment's ``record_autoscaling_stats`` reaches the controller, and pushed every
    second so the queue depths are fresh. It is scaled by Ray's default policy
    (``target_ongoing_requests`` and Ray's delays, passed through ``serve_options``)."""
    return {"min_replicas": min_replicas, "max_replicas": max_replicas,
            "metrics_interval_s": metrics_interval_s, "look_back_period_s": look_back_period_s,
            **serve_options}


# -- reading the contexts ----------------------------------------------------------------------


def _latest_per_replica(ctx: Any, name: str, now: Optional[float], max_age_s: Optional[float]) -> dict:
    """Each replica's latest value of a custom metric: from ``raw_metrics`` (the newest sample,
    dropped if older than ``max_age_s``), else the window aggregate in ``aggregated_metrics``."""
    raw = ctx.raw_metrics or {}
    out: dict = {}
    for rid, series in (raw.get(name) or {}).items():
        if not series:
            continue
        last = series[-1]
        if now is not None and max_age_s is not None and now - last.timestamp > max_age_s:
            continue
        out[rid] = float(last.value)
    if not out and not raw.get(name):
        agg = ctx.aggregated_metrics or {}
        out = {rid: float(v) for rid, v in (agg.get(name) or {}).items()}
    return {rid: v for rid, v in out.items() if math.isfinite(v)}


def _metric_names(ctx: Any) -> set[str]:
    # raw_metrics is cheap (the stored series); aggregated_metrics aggregates every series, so it
    # is only consulted when there is no raw data at all.
    return set(ctx.raw_metrics or {}) or set(ctx.aggregated_metrics or {})


def _number(value: Any) -> float:
    try:
        v = float(value or 0.0)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) and v > 0 else 0.0


class _EmberPolicyBase:
    def __init__(self, *, max_total_replicas: Optional[int] = None, pool_prefix: str = POOL_PREFIX,
                 pools: Optional[list[str]] = None, metric_max_age_s: Optional[float] = 30.0,
                 default_capacity_seqs: Optional[float] = None, count_handle_queue: bool = True,
                 budget_stickiness: float = 0.5, **knobs: Any):
        self.knobs = Knobs.from_dict(knobs)
        self.max_total_replicas = max_total_replicas
        self.pool_prefix = pool_prefix
        self.pools = set(pools) if pools else None
        self.metric_max_age_s = metric_max_age_s
        self.default_capacity_seqs = default_capacity_seqs
        self.count_handle_queue = count_handle_queue
        self.budget_stickiness = budget_stickiness
        self._warned: set[str] = set()

    def is_pool(self, ctx: Any) -> bool:
        name = ctx.deployment_name
        return name in self.pools if self.pools is not None else name.startswith(self.pool_prefix)

    def _fallback_capacity(self, ctx: Any) -> float:
        if self.default_capacity_seqs:
            return float(self.default_capacity_seqs)
        cfg = ctx.config
        target = getattr(cfg, "target_ongoing_requests", None) if cfg is not None else None
        if target:
            # Without reported capacity, size like Serve's default: target_ongoing_requests a replica.
            return float(target) / self.knobs.target_utilization
        return DEFAULT_CAPACITY_SEQS

    def _check_config(self, ctx: Any) -> None:
        cfg = ctx.config
        if cfg is None or ctx.deployment_name in self._warned:
            return
        delays = {k: getattr(cfg, k, 0) for k in ("upscale_delay_s", "downscale_delay_s")}
        if any(delays.values()):
            self._warned.add(ctx.deployment_name)
            log.warning("%s: Serve applies %s on top of Ember's policy; use pool_autoscaling_config() "
                        "(delays 0) so the policy's own timing holds", ctx.deployment_name, delays)

    def snapshot(self, ctx: Any, queued: Optional[Mapping[str, float]] = None) -> Snapshot:
        """A pool's ``Snapshot`` from its context plus the ingress queue depths by tier."""
        now = ctx.current_time if ctx.current_time is not None else time.time()
        age = self.metric_max_age_s
        running = _latest_per_replica(ctx, METRIC_RUNNING, now, age)
        waiting = _latest_per_replica(ctx, METRIC_WAITING, now, age)
        capacity = _latest_per_replica(ctx, METRIC_CAPACITY, now, age)
        if running:
            running_seqs = sum(running.values())
            waiting_seqs = sum(waiting.values())
        else:  # no replica reports (none running yet, or an engine without counters): Serve's count
            running_seqs = _number(ctx.total_running_requests)
            waiting_seqs = 0.0
        if self.count_handle_queue:
            waiting_seqs += _number(ctx.total_queued_requests)
        caps = [c for c in capacity.values() if c > 0]
        cap = sum(caps) / len(caps) if caps else self._fallback_capacity(ctx)
        return Snapshot(
            now=now, current_target=int(ctx.target_num_replicas), capacity_seqs=cap,
            running_replicas=int(ctx.current_num_replicas), running_seqs=running_seqs,
            waiting_seqs=waiting_seqs, queued=dict(queued or {}),
            min_replicas=int(ctx.capacity_adjusted_min_replicas),
            max_replicas=int(ctx.capacity_adjusted_max_replicas))

    @staticmethod
    def _state_in(ctx: Any) -> State:
        return State.from_dict((ctx.policy_state or {}).get(STATE_KEY, {}).get("state"))

    @staticmethod
    def _state_out(ctx: Any, d: Decision) -> dict[str, Any]:
        record_autoscaling(ctx.deployment_name, d.target, d.load)
        if d.target != ctx.target_num_replicas:
            log.info("%s: %d -> %d replicas (%s, load %.2f replicas)", ctx.deployment_name,
                     ctx.target_num_replicas, d.target, d.reason, d.load)
        return {STATE_KEY: {"state": d.state.to_dict(), "reason": d.reason, "load": d.load,
                            "desired": d.desired}}


class EmberPoolPolicy(_EmberPolicyBase):
    """Deployment-level policy: ``autoscaling_config.policy`` of one pool.

    Sees only its own replicas' metrics and Serve's handle queue; the ingress gates' queues and
    the budget need ``EmberAppPolicy``.
    """

    def __call__(self, ctx: Any) -> Tuple[int, Dict[str, Any]]:
        self._check_config(ctx)
        d = decide(self.snapshot(ctx), self._state_in(ctx), self.knobs)
        return d.target, self._state_out(ctx, d)


class EmberAppPolicy(_EmberPolicyBase):
    """Application-level policy: every pool of the app at once, under ``max_total_replicas``.

    Reads the ingress's ``ember_queued::<pool>::<tier>`` (summed over ingress replicas) and each
    pool's replica metrics, runs ``decide_all`` and returns a target for every deployment: pools
    from Ember's policy, anything else (the ingress) from Ray's default policy.
    """

    def queued_by_pool(self, contexts: Mapping[Any, Any]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for ctx in contexts.values():
            now = ctx.current_time if ctx.current_time is not None else time.time()
            for name in _metric_names(ctx):
                if not name.startswith(QUEUED_PREFIX):
                    continue
                pool, _, tier = name[len(QUEUED_PREFIX):].rpartition("::")
                if not pool:
                    continue
                total = sum(_latest_per_replica(ctx, name, now, self.metric_max_age_s).values())
                by_tier = out.setdefault(pool, {})
                by_tier[tier] = by_tier.get(tier, 0.0) + max(0.0, total)
        return out

    def __call__(self, contexts: Dict[Any, Any]) -> Tuple[Dict[Any, Any], Dict[Any, Dict[str, Any]]]:
        from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

        queued = self.queued_by_pool(contexts)
        pools = {dep_id: ctx for dep_id, ctx in contexts.items() if self.is_pool(ctx)}
        for ctx in pools.values():
            self._check_config(ctx)
        snaps = {dep_id: self.snapshot(ctx, queued.get(ctx.deployment_name)) for dep_id, ctx in pools.items()}
        states = {dep_id: self._state_in(ctx) for dep_id, ctx in pools.items()}
        decisions = decide_all(snaps, states, self.knobs, self.max_total_replicas,
                               self.budget_stickiness)

        targets: Dict[Any, Any] = {}
        new_state: Dict[Any, Dict[str, Any]] = {}
        for dep_id, ctx in contexts.items():
            if dep_id in decisions:
                targets[dep_id] = decisions[dep_id].target
                new_state[dep_id] = self._state_out(ctx, decisions[dep_id])
            else:
                replicas, st = replica_queue_length_autoscaling_policy(ctx)
                targets[dep_id] = replicas
                new_state[dep_id] = dict(st or {})
        return targets, new_state

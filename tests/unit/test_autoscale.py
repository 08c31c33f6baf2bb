"""Autoscaling: the pure policy (policies/autoscale.py, fake clock) and its Serve adapter
(deployments/autoscaling.py, real AutoscalingContext objects with made-up metrics; no Ray cluster)."""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.autoscale import (
    BudgetRequest,
    Knobs,
    Snapshot,
    State,
    allocate,
    decide,
    decide_all,
    load_of,
)

K = Knobs()
CAP = 16.0  # sequences a replica
PER_REPLICA = CAP * K.target_utilization  # 12.8


def snap(now: float, target: int, seqs: float, *, lo: int = 1, hi: int = 20, tier: str = "standard",
         cap: float = CAP) -> Snapshot:
    """`seqs` of demand: what the target's replicas hold runs, the rest waits at the ingress."""
    running = min(seqs, target * cap)
    return Snapshot(now=now, current_target=target, capacity_seqs=cap, running_replicas=target,
                    running_seqs=running, queued={tier: seqs - running}, min_replicas=lo, max_replicas=hi)


def simulate(demands, *, start: int = 1, lo: int = 1, hi: int = 20, dt: float = 1.0, knobs: Knobs = K,
             tier: str = "standard"):
    """Call the policy once every `dt` s; returns [(time, load, target before, decision)]."""
    state, target, trace = State(), start, []
    for i, seqs in enumerate(demands):
        s = snap(i * dt, target, seqs, lo=lo, hi=hi, tier=tier)
        d = decide(s, state, knobs)
        trace.append((i * dt, d.load, target, d))
        state, target = d.state, d.target
    return trace


def sustained(loads: list[tuple[float, float]], t: float, knobs: Knobs = K) -> float:
    """The lowest load of the upscale window ending at t: what a scale-up is decided on."""
    return min(x for s, x in loads if t - knobs.upscale_window_s <= s <= t)


def reversals(targets) -> int:
    moves = [b - a for a, b in zip(targets, targets[1:]) if b != a]
    return sum(1 for a, b in zip(moves, moves[1:]) if (a > 0) != (b > 0))


demand_seqs = st.floats(0, 400, allow_nan=False)


# -- the worked example and basic rules --------------------------------------------------------


def test_module_worked_example():
    def at(t, target, state, running, queued=0.0):
        s = Snapshot(now=t, current_target=target, capacity_seqs=16, running_seqs=running,
                     queued={"standard": queued}, min_replicas=1, max_replicas=8)
        return decide(s, state, K)

    d = at(0, 1, State(), 10)
    assert (d.target, d.reason) == (1, "hold") and d.load == pytest.approx(10 / 12.8)
    d = at(5, 1, d.state, 16, 24)
    assert (d.target, d.reason) == (4, "scale_up") and d.load == pytest.approx(3.125)
    state, target = d.state, d.target
    for t in range(6, 65):
        d = at(t, target, state, 40)
        assert d.target == 4
        state = d.state
    changes = []
    for t in range(65, 200):
        d = at(t, target, state, 19.2)
        if d.target != target:
            changes.append((t, target, d.target, d.reason))
        state, target = d.state, d.target
    assert changes == [(95, 4, 3, "scale_down"), (105, 3, 2, "scale_down")]


def test_scale_up_is_one_jump_on_the_same_call():
    d = decide(snap(0, 1, 4 * 12.8), State(), K)
    assert (d.target, d.reason) == (4, "scale_up")
    d = decide(snap(0, 1, 1000, hi=6), State(), K)
    assert (d.target, d.reason) == (6, "scale_up")
    d = decide(snap(0, 6, 1000, hi=6), d.state, K)
    assert (d.target, d.reason) == (6, "at_max")


def test_a_moments_burst_buys_no_replica_but_a_step_does_within_the_window():
    # A pool at its target utilization (load 1.0), a one-second burst to 3x at t=10, then a step
    # to 3x from t=20: the burst changes nothing; the step scales to 3 once it has held for the
    # 2 s window (calls every second: at t=22).
    demands = [PER_REPLICA] * 10 + [3 * PER_REPLICA] + [PER_REPLICA] * 9 + [3 * PER_REPLICA] * 10
    trace = simulate(demands)
    changes = [(t, before, d.target, d.reason) for t, _, before, d in trace if d.target != before]
    assert changes == [(22.0, 1, 3, "scale_up")]
    # With the window off, the burst buys two replicas at once.
    eager = simulate(demands, knobs=Knobs(upscale_window_s=0))
    assert [(t, d.target) for t, _, before, d in eager if d.target != before][0] == (10.0, 3)


def test_knobs_validate_and_load_from_dict():
    with pytest.raises(ValueError):
        Knobs(target_utilization=0)
    with pytest.raises(ValueError):
        Knobs(hysteresis=1.0)
    with pytest.raises(ValueError):
        Knobs.from_dict({"tier_weights": {"gold": 1.0}})
    with pytest.raises(TypeError):
        Knobs.from_dict({"no_such_knob": 1})
    k = Knobs.from_dict({"target_utilization": 0.9, "tier_weights": {"batch": 0.5}})
    assert k.target_utilization == 0.9 and k.weight("batch") == 0.5 and k.weight("priority") == 1.0


def test_state_round_trips_through_json():
    trace = simulate([50, 300, 300, 10, 0, 0])
    st_ = trace[-1][3].state
    assert State.from_dict(json.loads(json.dumps(st_.to_dict()))) == st_
    assert State.from_dict(None) == State()


def test_batch_does_not_buy_replicas_but_wakes_a_cold_pool():
    s = Snapshot(now=0, current_target=1, capacity_seqs=16, running_seqs=0, queued={"batch": 500},
                 min_replicas=0, max_replicas=8)
    assert decide(s, State(), K).target == 1
    cold = Snapshot(now=0, current_target=0, capacity_seqs=16, queued={"batch": 3}, min_replicas=0, max_replicas=8)
    assert (decide(cold, State(), K).target, decide(cold, State(), K).reason) == (1, "scale_up")
    assert decide(s, State(), Knobs.from_dict({"tier_weights": {"batch": 1.0}})).target == 8


# -- properties ---------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(demand_seqs, max_size=40), demand_seqs, st.floats(0, 200), st.floats(0, 200),
       st.sampled_from(["priority", "standard", "batch"]), st.integers(0, 3), st.integers(1, 30))
def test_monotone_in_demand(history, seqs, more_running, more_queued, tier, lo, span):
    """From any reachable state, more running or queued never yields fewer replicas."""
    hi = lo + span
    trace = simulate(history, start=max(lo, 1), lo=lo, hi=hi)
    state = trace[-1][3].state if trace else State()
    target = trace[-1][3].target if trace else max(lo, 1)
    now = float(len(history))
    base = snap(now, target, seqs, lo=lo, hi=hi)
    more = Snapshot(now=now, current_target=target, capacity_seqs=CAP, running_seqs=base.running_seqs + more_running,
                    queued={**base.queued, tier: base.queued.get(tier, 0) + more_queued},
                    min_replicas=lo, max_replicas=hi)
    assert decide(more, state, K).target >= decide(base, state, K).target


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(demand_seqs, st.floats(0, 200)), min_size=1, max_size=120), st.integers(0, 2))
def test_monotone_along_a_trajectory(pairs, lo):
    """A demand that is never lower, call after call, never has fewer replicas."""
    low = [a for a, _ in pairs]
    high = [a + b for a, b in pairs]
    t_low = [d.target for *_, d in simulate(low, start=max(lo, 1), lo=lo)]
    t_high = [d.target for *_, d in simulate(high, start=max(lo, 1), lo=lo)]
    assert all(a <= b for a, b in zip(t_low, t_high))


@settings(max_examples=60, deadline=None)
@given(st.floats(1, 300), st.floats(0, 1), st.integers(1, 20), st.integers(0, 2**32 - 1))
def test_steady_noisy_load_reverses_at_most_once_in_ten_minutes(level, noise_share, start, seed):
    """Steady demand whose noise stays inside the hysteresis band: ≤ 1 reversal in 600 calls."""
    h = K.hysteresis
    delta = noise_share * 0.95 * h / (2 - h)  # (1 - δ)/(1 + δ) ≥ 1 - h
    rng = random.Random(seed)
    demands = [level * (1 + rng.uniform(-delta, delta)) for _ in range(600)]
    targets = [start] + [d.target for *_, d in simulate(demands, start=start, hi=40)]
    assert reversals(targets) <= 1
    # It ends right-sized: enough for the highest sustained load (a moment's burst buys nothing),
    # no more than the hysteresis band above the peak.
    loads = [(float(i), x / PER_REPLICA) for i, x in enumerate(demands)]
    held = max(sustained(loads, t) for t, _ in loads)
    peak = max(demands) / PER_REPLICA
    assert max(1, math.ceil(held - 1e-9)) <= targets[-1] <= max(1, math.ceil(peak / (1 - h) + 1e-9))


@settings(max_examples=150, deadline=None)
@given(st.lists(demand_seqs, min_size=1, max_size=150), st.integers(0, 3), st.integers(0, 10))
def test_up_on_sustained_load_down_only_after_the_delay_one_step_at_a_time(demands, lo, span):
    hi = lo + span
    trace = simulate(demands, start=max(lo, min(1, hi)), lo=lo, hi=hi)
    loads = [(t, load) for t, load, *_ in trace]
    last_change = None
    for t, load, before, d in trace:
        assert lo <= before <= hi
        low = sustained(loads, t)
        need = 0 if low <= 1e-9 else math.ceil(low - 1e-9)
        if need > before:
            assert d.target == min(need, hi) and d.reason in ("scale_up", "at_max")
        if d.target < before:
            assert d.target == before - 1
            assert t >= K.downscale_delay_s
            assert last_change is None or t - last_change >= K.downscale_step_interval_s
            if d.reason == "scale_down":
                window = [x for s, x in loads if t - K.downscale_delay_s <= s <= t]
                assert all(math.ceil(x / (1 - K.hysteresis) - 1e-9) < before for x in window)
            else:
                assert d.reason == "idle_to_zero" and lo == 0 and before == 1
        if d.target != before:
            last_change = t


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 30), st.integers(0, 5), st.integers(0, 12), demand_seqs)
def test_target_always_within_bounds(current, lo, span, seqs):
    hi = lo + span
    d = decide(snap(0, current, seqs, lo=lo, hi=hi), State(), K)
    assert lo <= d.target <= hi
    if current > hi:
        assert d.reason == "clamp_max"
    if current < lo:
        assert d.reason == "clamp_min"


def test_scale_to_zero_only_for_min_zero_after_idle_period():
    idle = [30.0] * 5 + [0.0] * 2000
    for lo in (1, 2):
        assert min(d.target for *_, d in simulate(idle, start=3, lo=lo)) == lo
    trace = simulate(idle, start=3, lo=0)
    zero_at = next(t for t, _, _, d in trace if d.target == 0)
    assert zero_at >= 5 + K.idle_to_zero_s
    assert next(d.reason for *_, d in trace if d.target == 0) == "idle_to_zero"
    # A single queued request in the idle stretch restarts the clock.
    blip = idle[:]
    blip[200] = 1.0
    trace = simulate(blip, start=3, lo=0)
    assert next(t for t, _, _, d in trace if d.target == 0) >= 200 + K.idle_to_zero_s
    # Waking from zero happens on the first call that sees demand.
    s = Snapshot(now=0, current_target=0, capacity_seqs=16, queued={"standard": 40}, min_replicas=0, max_replicas=8)
    assert decide(s, State(), K).target == 4


# -- the shared budget --------------------------------------------------------------------------


@st.composite
def budget_requests(draw):
    n = draw(st.integers(1, 5))
    out = {}
    for i in range(n):
        lo = draw(st.integers(0, 3))
        hi = lo + draw(st.integers(0, 10))
        desired = draw(st.integers(lo, hi))
        loads = sorted(draw(st.lists(st.floats(0, 15), min_size=3, max_size=3)))
        out[f"m{i}"] = BudgetRequest(lo, hi, desired, tuple(loads), draw(st.integers(0, hi)))
    return out


@settings(max_examples=300, deadline=None)
@given(budget_requests(), st.integers(0, 40))
def test_budget_respects_cap_and_minimums(requests, extra):
    mins = sum(r.min_replicas for r in requests.values())
    cap = mins + extra
    alloc = allocate(requests, cap)
    assert sum(alloc.values()) <= cap
    for k, r in requests.items():
        assert r.min_replicas <= alloc[k] <= max(r.desired, r.min_replicas)
    wants = {k: r.desired for k, r in requests.items()}
    if sum(wants.values()) <= cap:
        assert alloc == wants
    elif sum(alloc.values()) < cap:
        pytest.fail(f"budget left unused while a model wants more: {alloc} of {cap}")


def test_budget_keeps_minimums_even_over_the_cap():
    reqs = {"a": BudgetRequest(2, 5, 5, (5, 5, 5)), "b": BudgetRequest(2, 5, 2)}
    assert allocate(reqs, 3) == {"a": 2, "b": 2}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=4), st.integers(1, 3), st.integers(0, 20))
def test_a_surging_model_gets_the_cap_less_the_others_minimums(other_mins, surge_min, extra):
    cap = sum(other_mins) + surge_min + extra
    reqs = {f"o{i}": BudgetRequest(m, m + 5, m, (0.1, 0.1, 0.1), current=m + 2) for i, m in enumerate(other_mins)}
    reqs["surge"] = BudgetRequest(surge_min, 100, 100, (40, 90, 90), current=surge_min)
    alloc = allocate(reqs, cap)
    assert alloc["surge"] == cap - sum(other_mins)
    assert all(alloc[f"o{i}"] == m for i, m in enumerate(other_mins))


def test_budget_docstring_example_and_priority_first():
    a = Snapshot(now=0, current_target=1, capacity_seqs=16, running_seqs=20, queued={"standard": 40},
                 min_replicas=1, max_replicas=8)
    b = Snapshot(now=0, current_target=1, capacity_seqs=16, running_seqs=8, queued={"priority": 16},
                 min_replicas=1, max_replicas=8)
    ra = BudgetRequest.of(a, decide(a, State(), K), K)
    rb = BudgetRequest(1, 8, 3, BudgetRequest.of(b, decide(b, State(), K), K).loads, 1)
    assert ra.desired == 5 and [round(x, 2) for x in ra.loads] == [1.56, 4.69, 4.69]
    assert [round(x, 2) for x in rb.loads] == [1.88, 1.88, 1.88]
    assert allocate({"A": ra, "B": rb}, 6) == {"A": 4, "B": 2}
    # One spare replica: the Priority queue gets it over a larger Standard queue.
    p = BudgetRequest(1, 8, 3, (2.5, 2.5, 2.5), 1)
    s = BudgetRequest(1, 8, 5, (1.0, 4.5, 4.5), 1)
    assert allocate({"p": p, "s": s}, 3) == {"p": 2, "s": 1}


def test_budget_does_not_move_a_replica_over_a_near_tie():
    held = BudgetRequest(1, 8, 3, (3.0, 3.0, 3.0), current=3)
    rival = BudgetRequest(1, 8, 4, (3.3, 3.3, 3.3), current=2)
    assert allocate({"held": held, "rival": rival}, 5) == {"held": 3, "rival": 2}
    assert allocate({"held": held, "rival": rival}, 5, stickiness=0.0) == {"held": 2, "rival": 3}


def test_decide_all_budget_surge_and_reason():
    snaps = {
        "hot": Snapshot(now=0, current_target=1, capacity_seqs=16, running_seqs=16, queued={"standard": 300},
                        min_replicas=1, max_replicas=20),
        "cold1": Snapshot(now=0, current_target=1, capacity_seqs=16, min_replicas=1, max_replicas=20),
        "cold0": Snapshot(now=0, current_target=0, capacity_seqs=16, min_replicas=0, max_replicas=20),
        "warm": Snapshot(now=0, current_target=2, capacity_seqs=16, running_seqs=20, min_replicas=2, max_replicas=20),
    }
    out = decide_all(snaps, {}, K, total_cap=10)
    assert out["hot"].target == 10 - 1 - 0 - 2 and out["hot"].reason == "budget"
    assert out["hot"].state.last_change_s == 0
    assert (out["cold1"].target, out["cold0"].target, out["warm"].target) == (1, 0, 2)
    assert decide_all(snaps, {}, K)["hot"].target == 20  # ceil(316 / 12.8) = 25, over its max


# -- the Serve adapter --------------------------------------------------------------------------

pytest.importorskip("ray.serve.config")

from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue  # noqa: E402
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy  # noqa: E402

from deployments.autoscaling import (  # noqa: E402
    POLICY_APP,
    EmberAppPolicy,
    EmberPoolPolicy,
    ingress_autoscaling_config,
    ingress_stats,
    pool_autoscaling_config,
    pool_stats,
)

APP = "ember"
NOW = 1_000_000.0


def ctx(name: str, *, target: int = 1, replica_metrics: dict | None = None, config: AutoscalingConfig | None = None,
        total_num_requests: float = 0.0, total_queued: float = 0.0, policy_state: dict | None = None,
        now: float = NOW, age: float = 0.5) -> AutoscalingContext:
    """A context whose replicas reported `replica_metrics` ({replica: {metric: value}}) `age` s ago."""
    dep = DeploymentID(name=name, app_name=APP)
    replicas = [ReplicaID(unique_id=r, deployment_id=dep) for r in (replica_metrics or {})]
    raw: dict = {}
    for rid in replicas:
        for metric, value in replica_metrics[rid.unique_id].items():
            raw.setdefault(metric, {})[rid] = [TimeStampedValue(now - age - 1, 0.0), TimeStampedValue(now - age, value)]
    cfg = config or AutoscalingConfig(**pool_autoscaling_config(1, 8))
    return AutoscalingContext(
        deployment_id=dep, deployment_name=name, app_name=APP, current_num_replicas=len(replicas),
        target_num_replicas=target, running_replicas=replicas, total_num_requests=total_num_requests,
        total_queued_requests=total_queued, aggregated_metrics=lambda: {}, raw_metrics=lambda: raw,
        capacity_adjusted_min_replicas=cfg.min_replicas, capacity_adjusted_max_replicas=cfg.max_replicas,
        policy_state=policy_state or {}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=now, config=cfg)


INGRESS_CFG = AutoscalingConfig(**ingress_autoscaling_config(2, 2, target_ongoing_requests=64))


def test_reporting_helpers_and_pool_config():
    assert pool_stats(3, 1, 16) == {"ember_running_seqs": 3.0, "ember_waiting_seqs": 1.0, "ember_capacity_seqs": 16.0}
    stats = ingress_stats({"pool-a": {"priority": 2}})
    assert stats == {"ember_queued::pool-a::priority": 2.0, "ember_queued::pool-a::standard": 0.0,
                     "ember_queued::pool-a::batch": 0.0}
    cfg = AutoscalingConfig(**pool_autoscaling_config(0, 4, policy_kwargs={"target_utilization": 0.9}))
    assert (cfg.upscale_delay_s, cfg.downscale_delay_s, cfg.min_replicas, cfg.max_replicas) == (0, 0, 0, 4)
    assert cfg.policy.policy_function == "deployments.autoscaling:EmberPoolPolicy"
    assert cfg.policy.get_serialized_policy_def()
    assert AutoscalingConfig(**pool_autoscaling_config(1, 2, policy=None)).policy.is_default_policy_function()
    assert (INGRESS_CFG.metrics_interval_s, INGRESS_CFG.look_back_period_s) == (1.0, 5.0)


def test_app_policy_sizes_pool_from_ingress_queue_and_replica_metrics():
    ingress = ctx("ingress", target=2, config=INGRESS_CFG, total_num_requests=256, replica_metrics={
        "i1": ingress_stats({"pool-a": {"standard": 20, "priority": 4}}),
        "i2": ingress_stats({"pool-a": {"standard": 8}}),
    })
    pool = ctx("pool-a", replica_metrics={"r1": pool_stats(16, 4, 16)}, total_queued=0)
    policy = EmberAppPolicy()
    assert policy.queued_by_pool({1: ingress}) == {"pool-a": {"priority": 4.0, "standard": 28.0, "batch": 0.0}}
    targets, state = policy({ingress.deployment_id: ingress, pool.deployment_id: pool})
    # (16 running + 4 waiting + 32 queued) / 12.8 = 4.06 → 5, at once.
    assert targets[pool.deployment_id] == 5
    assert state[pool.deployment_id]["ember"]["reason"] == "scale_up"
    # The ingress is decided too, by Ray's default policy: 256 ongoing / (64 a replica) = 4
    # (Serve then clamps it to its max of 2).
    assert targets[ingress.deployment_id] == pytest.approx(4)


def test_app_policy_enforces_total_budget_across_pools():
    ingress = ctx("ingress", target=2, config=INGRESS_CFG, replica_metrics={
        "i1": ingress_stats({"pool-hot": {"standard": 500}, "pool-idle": {}, "pool-other": {}})})
    hot = ctx("pool-hot", replica_metrics={"h1": pool_stats(16, 0, 16)})
    idle = ctx("pool-idle", replica_metrics={"d1": pool_stats(0, 0, 16)})
    other = ctx("pool-other", target=2, replica_metrics={"o1": pool_stats(3, 0, 16), "o2": pool_stats(2, 0, 16)},
                config=AutoscalingConfig(**pool_autoscaling_config(2, 8)))
    contexts = {c.deployment_id: c for c in (ingress, hot, idle, other)}
    targets, _ = EmberAppPolicy(max_total_replicas=8)(contexts)
    assert targets[hot.deployment_id] == 8 - 1 - 2
    assert (targets[idle.deployment_id], targets[other.deployment_id]) == (1, 2)


def test_app_policy_through_serve_wrapper_keeps_state_and_drains_slowly():
    """Load the policy the way the controller does (import path + kwargs, class instantiated once),
    wrap it with Serve's app-level wrapper, and run it for a while."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.autoscaling_policy import _apply_app_level_autoscaling_config

    policy = _apply_app_level_autoscaling_config(_resolve_policy_callable(
        AutoscalingPolicy(policy_function=POLICY_APP, policy_kwargs={"downscale_delay_s": 20})))
    states: dict = {}
    target = 1
    history = []
    for i in range(120):
        now = NOW + i
        seqs = 60 if i < 40 else 5
        running = min(seqs, 16 * target)
        ingress = ctx("ingress", target=2, config=INGRESS_CFG, now=now, policy_state=states.get("i"),
                      replica_metrics={"i1": ingress_stats({"pool-a": {"standard": seqs - running}})})
        pool = ctx("pool-a", target=target, now=now, policy_state=states.get("p"),
                   replica_metrics={f"r{j}": pool_stats(running / target, 0, 16) for j in range(target)})
        decisions, new_states = policy({ingress.deployment_id: ingress, pool.deployment_id: pool})
        states = {"i": new_states[ingress.deployment_id], "p": new_states[pool.deployment_id]}
        assert "ember" in states["p"]
        target = decisions[pool.deployment_id]
        history.append(target)
    assert history[0] == 5  # 60 / 12.8 = 4.7, on the first call
    assert history[40:60] == [5] * 20  # held for the 20 s delay
    assert history[-1] == 1 and reversals(history) == 0
    steps = [i for i in range(1, 120) if history[i] < history[i - 1]]
    assert all(b - a >= 10 for a, b in zip(steps, steps[1:]))


def test_serve_delays_left_on_hold_the_upscale():
    """Why pools need pool_autoscaling_config(): Ray's own upscale_delay_s applies on top."""
    from ray.serve.autoscaling_policy import _apply_app_level_autoscaling_config

    slow = AutoscalingConfig(min_replicas=1, max_replicas=8, upscale_delay_s=30)
    policy = _apply_app_level_autoscaling_config(EmberAppPolicy())
    pool = ctx("pool-a", config=slow, replica_metrics={"r1": pool_stats(16, 40, 16)})
    decisions, _ = policy({pool.deployment_id: pool})
    assert decisions[pool.deployment_id] == 1
    fast = ctx("pool-a", replica_metrics={"r1": pool_stats(16, 40, 16)})
    decisions, _ = policy({fast.deployment_id: fast})
    assert decisions[fast.deployment_id] == 5


def test_pool_policy_deployment_level_uses_handle_queue_and_falls_back_without_metrics():
    policy = EmberPoolPolicy(target_utilization=1.0)
    c = ctx("pool-a", replica_metrics={"r1": pool_stats(16, 0, 16)}, total_queued=16)
    target, state = policy(c)
    assert target == 2 and state["ember"]["reason"] == "scale_up"
    # No Ember metrics (e.g. before the first report): Serve's own counts, capacity from
    # target_ongoing_requests.
    bare = ctx("pool-a", config=AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=4,
                                                  upscale_delay_s=0), total_num_requests=12, total_queued=0)
    assert policy(bare)[0] == 3


def test_stale_replica_metrics_are_ignored():
    stale = ctx("pool-a", replica_metrics={"r1": pool_stats(16, 100, 16)}, age=120)
    snapshot = EmberAppPolicy().snapshot(stale)
    assert snapshot.running_seqs == 0 and snapshot.waiting_seqs == 0
    fresh = ctx("pool-a", replica_metrics={"r1": pool_stats(16, 100, 16)})
    assert EmberAppPolicy().snapshot(fresh).waiting_seqs == 100
    assert load_of(EmberAppPolicy().snapshot(fresh), K) == pytest.approx(116 / 12.8)

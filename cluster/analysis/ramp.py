"""The rate-limit ramp on a simulated clock: the real limiter in-process, and the pure policy.

Used by ``notebooks/rate_limit_ramp.ipynb`` and ``tests/benchmarks/rate_limit.py``. Nothing here
starts Ray or touches a network: the ``RateLimiter`` runs in this process behind an actor-shaped
wrapper, on a memory store, with a clock the simulation advances.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from types import SimpleNamespace
from typing import Callable

from cluster.config import ModelConfig, RateLimitConfig
from cluster.stores import MemoryLimitStore
from deployments.rate_limiter import LimiterClient, RateLimiter, model_bounds
from policies.rate_limit import BUDGETS, BudgetState, Budgets, RampRule, advance, decide

ACCOUNT = "demo"
SMALL_MODEL = ModelConfig(id="accounts/ember/models/ramp-small", params_billions=8)  # size class small
HOUR = 3600.0
MARKS = [(0, "start"), (600, "10 min"), (3600, "1 h"), (7200, "2 h"), (3 * 3600, "3 h"), (4 * 3600, "4 h"),
         (5 * 3600, "5 h"), (6 * 3600, "6 h")]
README_MARKS = MARKS[:4]
# A request of the simulated callers: prompt, cached prompt and generated tokens in the same
# proportion as the small model's floors (60k : 30k : 12k), so all three budgets ramp alike.
SIM_REQUEST = (1000, 500, 200)


class SimClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class InProcessActor:
    """``handle.method.remote(...)`` -> awaitable, like a Ray actor handle (as the contract tests do)."""

    def __init__(self, obj) -> None:
        self._obj = obj

    def __getattr__(self, name):
        return SimpleNamespace(remote=getattr(self._obj, name))


def doubling(start_per_min: float, doubling_s: float = HOUR) -> Callable[[float], float]:
    """Offered prompt tokens per minute at simulated second t: doubles every ``doubling_s``."""
    return lambda t: start_per_min * 2.0 ** (t / doubling_s)


def steps(*pieces: tuple[float, float]) -> Callable[[float], float]:
    """Piecewise-constant traffic: ((until_s, prompt_tokens_per_min), ...); 0 after the last."""
    def rate(t: float) -> float:
        for until, per_min in pieces:
            if t < until:
                return per_min
        return 0.0
    return rate


def _split(prompt_tokens: float, request=SIM_REQUEST) -> dict[str, float]:
    p, cached, gen = request
    k = prompt_tokens / p
    return {"prompt": prompt_tokens, "uncached": (p - cached) * k, "generated": gen * k}


def simulate_limiter(rate_fn: Callable[[float], float], duration_s: float, *, n_clients: int = 4,
                     request: tuple[int, int, int] = SIM_REQUEST, model: ModelConfig = SMALL_MODEL,
                     spend_tier: int = 1, rate_limit: RateLimitConfig | None = None, seed: int = 0,
                     sample_s: float = 60.0) -> dict:
    """Drive the real ``RateLimiter`` and ``n_clients`` ``LimiterClient`` s (one per ingress
    replica) on one event loop with a simulated clock and a memory store.

    Requests of ``request`` = (prompt, cached, generated) tokens arrive as a Poisson process whose
    rate follows ``rate_fn(t)`` (offered prompt tokens per minute at simulated second t), each at
    a random client, and are settled with their actual usage at once. Idle leases are returned
    every ``lease_idle_s / 2`` simulated seconds, as the clients' reaper does in real time.

    Returns per-sample series (every ``sample_s``): the actor's limit and usage per budget (usage
    includes tokens leased to clients and not yet returned), offered and admitted tokens per
    budget over the preceding period, and 429s by the budget that refused them.
    """
    coro = _simulate_limiter(rate_fn, duration_s, n_clients, request, model, spend_tier,
                             rate_limit or RateLimitConfig(), seed, sample_s)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from a running loop (a notebook's kernel): run the simulation on a loop of its own.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _simulate_limiter(rate_fn, duration_s, n_clients, request, model, spend_tier, config, seed,
                            sample_s) -> dict:
    import numpy as np

    clock = SimClock(1_000.0)
    limiter = RateLimiter(config, "memory://", clock=clock, store=MemoryLimitStore())
    handle = InProcessActor(limiter)
    clients = [LimiterClient(config, lambda shard: handle, clock=clock) for _ in range(n_clients)]
    for c in clients:
        # The real reaper sleeps in wall-clock time; the loop below returns idle leases on the
        # simulated clock instead, at the reaper's period.
        c._ensure_reaper = lambda: None
    rng = np.random.default_rng(seed)
    prompt, cached, generated = request
    cost = clients[0].reservation(prompt, generated, 1)
    actual = {"prompt": prompt, "uncached": prompt - cached, "generated": generated}
    scope = f"{ACCOUNT}|{model.id}"
    floor, ceiling = model_bounds(model, spend_tier)
    rule = limiter.rule
    t0 = clock.t
    reap_every = config.lease_idle_s / 2

    samples: list[dict] = []
    period = {"offered": Counter(), "admitted": Counter(), "requests": 0, "refused": Counter()}
    total_refused: Counter[str] = Counter()
    total_requests = 0
    first_refusal_s: float | None = None

    def sample(t: float) -> None:
        states = limiter._states.get(scope, {})  # introspection: the actor's own state, advanced to t
        now = t0 + t
        row = {"t_s": t, "limit": {}, "usage": {}, "offered_per_min": {}, "admitted_per_min": {},
               "requests": period["requests"], "refused": sum(period["refused"].values()),
               "refused_by": dict(period["refused"]), "traffic_per_min": _split(rate_fn(t), request)}
        for b in BUDGETS:
            s = states.get(b) or BudgetState.fresh(floor.get(b), now)
            s = advance(s, now, floor.get(b), ceiling.get(b), rule)
            row["limit"][b] = s.limit
            row["usage"][b] = s.usage
            row["offered_per_min"][b] = period["offered"][b] * 60.0 / sample_s
            row["admitted_per_min"][b] = period["admitted"][b] * 60.0 / sample_s
        samples.append(row)
        period["offered"].clear()
        period["admitted"].clear()
        period["refused"].clear()
        period["requests"] = 0

    n_seconds = int(math.ceil(duration_s))
    for sec in range(n_seconds):
        if sec % sample_s == 0:
            sample(float(sec))
        lam = rate_fn(float(sec)) / prompt / 60.0  # requests per second
        n = int(rng.poisson(lam)) if lam > 0 else 0
        events = [(sec + float(off), 1) for off in rng.random(n)]
        events += [(sec + k * reap_every, 0) for k in range(int(round(1 / reap_every)))]
        events.sort()
        for t, kind in events:
            clock.t = t0 + t
            if kind == 0:
                for c in clients:
                    await c.return_idle(clock.t - config.lease_idle_s)
                continue
            client = clients[int(rng.integers(n_clients))]
            adm = await client.admit(ACCOUNT, model, spend_tier, cost)
            total_requests += 1
            period["requests"] += 1
            for b in BUDGETS:
                period["offered"][b] += actual[b]
            if adm.allowed:
                client.settle(adm, prompt, cached, generated)
                for b in BUDGETS:
                    period["admitted"][b] += actual[b]
            else:
                period["refused"][adm.exhausted] += 1
                total_refused[adm.exhausted] += 1
                if first_refusal_s is None:
                    first_refusal_s = t
    sample(float(n_seconds))
    for c in clients:
        await c.close()
    return {
        "samples": samples,
        "requests": total_requests,
        "refused": sum(total_refused.values()),
        "refused_by": dict(total_refused),
        "first_refusal_s": first_refusal_s,
        "request": {"prompt": prompt, "cached": cached, "generated": generated},
        "n_clients": n_clients,
        "floor": {b: floor.get(b) for b in BUDGETS},
        "ceiling": {b: ceiling.get(b) for b in BUDGETS},
    }


def policy_run(duration_s: float, floor: Budgets, ceiling: Budgets, rule: RampRule = RampRule(), *,
               rate_fn: Callable[[float], float] | None = None, step_s: float = 1.0,
               sample_s: float = 60.0) -> dict:
    """The pure policy (``decide``) on a simulated clock, one request every ``step_s``.

    With ``rate_fn`` the request carries ``rate_fn(t) / 60 * step_s`` prompt tokens (and the other
    budgets in the floors' proportion); without it the caller keeps its bucket saturated: every
    step it asks for everything that is available in every budget.
    """
    states: dict[str, BudgetState] = {}
    samples, refused = [], 0
    t = 0.0
    while t <= duration_s + 1e-9:
        if rate_fn is None:
            cost = {b: advance(states.get(b) or BudgetState.fresh(floor.get(b), t), t, floor.get(b),
                               ceiling.get(b), rule).available for b in BUDGETS}
        else:
            per_min = rate_fn(t)
            cost = {b: per_min * floor.get(b) / floor.prompt / 60.0 * step_s for b in BUDGETS}
        d = decide(states, cost, t, floor, ceiling, rule)
        if d.allowed:
            states = d.states
        else:
            refused += 1
        if abs(t / sample_s - round(t / sample_s)) < 1e-9:
            s = d.states  # refused: the states moved to t, without the request
            samples.append({"t_s": t, "limit": {b: s[b].limit for b in BUDGETS},
                            "usage": {b: s[b].usage for b in BUDGETS},
                            "traffic_per_min": ({b: rate_fn(t) * floor.get(b) / floor.prompt for b in BUDGETS}
                                                if rate_fn else None)})
        t = round(t + step_s, 9)
    return {"samples": samples, "refused": refused}


def at(samples: list[dict], t: float) -> dict | None:
    for s in samples:
        if abs(s["t_s"] - t) < 1e-6:
            return s
    return None


def compact(v: float) -> str:
    """Tokens per minute, compact: 60,000 -> 60k, 2,000,000 -> 2.00M."""
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e4:
        return f"{v / 1e3:.0f}k" if v >= 1e5 else f"{v / 1e3:.1f}k"
    return f"{v:,.0f}"


def markdown_table(samples: list[dict], marks, traffic: bool) -> str:
    names = {"prompt": "prompt", "uncached": "uncached (cache-adjusted) prompt", "generated": "generated"}
    cols = [label for t, label in marks if at(samples, t)]
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    if traffic:
        lines.append("| prompt traffic (tokens/min) | " + " | ".join(
            f"{at(samples, t)['traffic_per_min']['prompt']:,.0f}" for t, _ in marks if at(samples, t)) + " |")
    for b in BUDGETS:
        lines.append(f"| {names[b]} limit (tokens/min) | " + " | ".join(
            f"{at(samples, t)['limit'][b]:,.0f}" for t, _ in marks if at(samples, t)) + " |")
    return "\n".join(lines)

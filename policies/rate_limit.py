"""Adaptive per-minute token limits: pure decisions, the clock passed in.

Each (account, model) has three budgets, all in tokens per minute: ``prompt`` (all prompt tokens),
``uncached`` (prompt tokens not served from the prefix cache) and ``generated``. A Fast variant is
its own model; Priority shares its model's budgets.

**Admission** is a token bucket per budget: capacity = the current limit, refilled at
limit/60 tokens per second. A request is admitted only if every budget covers its cost; a burst
above the limit is refused at once with the time after which it would fit (``retry_after_s``).

**The limit moves** between a floor and a ceiling (the ceiling comes from the model's size class
and the account's spend tier). Three rules, with ``RampRule``'s defaults:

1. *Ramp.* The limit follows ``headroom × usage``, where usage is an exponential moving average
   of admitted tokens per minute with time constant ``usage_tau_s`` (5 min). With headroom 2,
   traffic that doubles every hour keeps its limit at about 1.9× its current rate, so it never
   sees a 429.
2. *Speed bound.* The limit at most doubles every ``max_doubling_s`` (20 min), so a sudden 10×
   burst is held near the old limit for the whole minute instead of buying its own headroom.
3. *Idle decay.* Without use the limit decays toward the floor with time constant
   ``idle_decay_tau_s`` (10 min): after an idle hour, e^-6 ≈ 0.25% of the excess is left.

Worked example, floor 10,000 and ceiling 1,000,000 tokens/min: a caller that keeps its bucket
empty grows its limit to about 13k (10 min) → 74k (1 h) → 590k (2 h), just under the speed
bound's 14.1k → 80k → 640k because its usage average has to climb first; a caller that then
stops for an hour falls back to about 10k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum

BUDGETS = ("prompt", "uncached", "generated")


class SizeClass(str, Enum):
    SMALL = "small"    # < 400B parameters
    MEDIUM = "medium"  # < 1.6T
    LARGE = "large"


def size_class(params_billions: float) -> SizeClass:
    if params_billions < 400:
        return SizeClass.SMALL
    if params_billions < 1600:
        return SizeClass.MEDIUM
    return SizeClass.LARGE


@dataclass(frozen=True, slots=True)
class Budgets:
    """Tokens per minute for each budget."""

    prompt: float
    uncached: float
    generated: float

    def get(self, name: str) -> float:
        return getattr(self, name)

    def scaled(self, k: float) -> "Budgets":
        return Budgets(self.prompt * k, self.uncached * k, self.generated * k)


# Floors and tier-1 ceilings per size class, tokens per minute. Larger models cost more per token,
# so they start lower.
FLOORS = {
    SizeClass.SMALL: Budgets(60_000, 30_000, 12_000),
    SizeClass.MEDIUM: Budgets(30_000, 15_000, 6_000),
    SizeClass.LARGE: Budgets(15_000, 7_500, 3_000),
}
TIER1_CEILINGS = {
    SizeClass.SMALL: Budgets(2_000_000, 1_000_000, 400_000),
    SizeClass.MEDIUM: Budgets(1_000_000, 500_000, 200_000),
    SizeClass.LARGE: Budgets(500_000, 250_000, 100_000),
}
# Spend tier → multiplier of the ceiling. "unlimited" is tier 5.
TIER_MULTIPLIER = {1: 1, 2: 2, 3: 4, 4: 8, 5: 32}


def bounds(cls: SizeClass, spend_tier: int) -> tuple[Budgets, Budgets]:
    """(floor, ceiling) for a model's size class and an account's spend tier."""
    return FLOORS[cls], TIER1_CEILINGS[cls].scaled(TIER_MULTIPLIER[max(1, min(5, spend_tier))])


@dataclass(frozen=True, slots=True)
class RampRule:
    headroom: float = 2.0
    usage_tau_s: float = 300.0
    idle_decay_tau_s: float = 600.0
    max_doubling_s: float = 1200.0


@dataclass(frozen=True, slots=True)
class BudgetState:
    limit: float        # tokens per minute
    usage: float        # EWMA of admitted tokens per minute
    available: float    # token-bucket level
    updated_at: float   # seconds, caller's clock

    @staticmethod
    def fresh(floor: float, now: float) -> "BudgetState":
        return BudgetState(limit=floor, usage=0.0, available=floor, updated_at=now)


def advance(s: BudgetState, now: float, floor: float, ceiling: float, rule: RampRule) -> BudgetState:
    """The state at ``now``: usage decays, the limit moves, the bucket refills."""
    dt = max(0.0, now - s.updated_at)
    if dt == 0:
        return s
    usage = s.usage * math.exp(-dt / rule.usage_tau_s)
    decayed = floor + (s.limit - floor) * math.exp(-dt / rule.idle_decay_tau_s)
    # Integrating the bucket with the old limit over dt is exact enough at the ms-to-s steps seen.
    target = max(decayed, rule.headroom * usage)
    limit = min(ceiling, max(floor, min(target, s.limit * 2 ** (dt / rule.max_doubling_s))))
    available = min(limit, s.available + s.limit * dt / 60.0)
    return BudgetState(limit=limit, usage=usage, available=available, updated_at=now)


def record(s: BudgetState, tokens: float, rule: RampRule) -> BudgetState:
    """Take ``tokens`` from the bucket and count them as usage (negative tokens refund)."""
    return replace(
        s,
        usage=max(0.0, s.usage + tokens * 60.0 / rule.usage_tau_s),
        available=min(s.limit, s.available - tokens),
    )


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    retry_after_s: float
    limits: dict[str, int]
    remaining: dict[str, int]
    exhausted: str | None = None  # the budget that refused the request
    states: dict[str, BudgetState] = field(default_factory=dict)


def decide(
    states: dict[str, BudgetState],
    cost: dict[str, float],
    now: float,
    floor: Budgets,
    ceiling: Budgets,
    rule: RampRule = RampRule(),
) -> Decision:
    """Admit ``cost`` (tokens per budget) against every budget, or refuse it as a whole.

    A cost larger than the whole limit can never fit; it is refused with the time until the
    limit could have ramped to it, never queued.
    """
    moved = {b: advance(states.get(b) or BudgetState.fresh(floor.get(b), now), now,
                        floor.get(b), ceiling.get(b), rule) for b in BUDGETS}
    worst, wait = None, 0.0
    for b in BUDGETS:
        need = cost.get(b, 0.0)
        s = moved[b]
        if need > s.available:
            w = (need - s.available) / (s.limit / 60.0)
            if w > wait or worst is None:
                worst, wait = b, w
    if worst is not None:
        return Decision(False, round(max(wait, 0.001), 3), _ints(moved, "limit"), _remaining(moved),
                        worst, moved)
    after = {b: record(moved[b], cost.get(b, 0.0), rule) for b in BUDGETS}
    return Decision(True, 0.0, _ints(after, "limit"), _remaining(after), None, after)


def settle(states: dict[str, BudgetState], refund: dict[str, float], now: float, floor: Budgets,
           ceiling: Budgets, rule: RampRule = RampRule()) -> dict[str, BudgetState]:
    """Give back what a request reserved but did not use (a negative refund charges extra)."""
    out = {}
    for b in BUDGETS:
        s = advance(states.get(b) or BudgetState.fresh(floor.get(b), now), now, floor.get(b), ceiling.get(b), rule)
        out[b] = record(s, -refund.get(b, 0.0), rule)
    return out


def _ints(states: dict[str, BudgetState], attr: str) -> dict[str, int]:
    return {b: int(getattr(s, attr)) for b, s in states.items()}


def _remaining(states: dict[str, BudgetState]) -> dict[str, int]:
    return {b: max(0, int(s.available)) for b, s in states.items()}


@dataclass(frozen=True, slots=True)
class RequestBucket:
    """The fixed account-wide requests-per-minute cap, as a token bucket."""

    available: float
    updated_at: float

    @staticmethod
    def fresh(rpm: int, now: float) -> "RequestBucket":
        return RequestBucket(float(rpm), now)

    def take(self, rpm: int, now: float, n: int = 1) -> tuple[int, float, "RequestBucket"]:
        """Take up to ``n`` requests: (how many were granted, retry_after_s if none, new state)."""
        available = min(float(rpm), self.available + max(0.0, now - self.updated_at) * rpm / 60.0)
        granted = min(n, int(available))
        if granted >= 1:
            return granted, 0.0, RequestBucket(available - granted, now)
        return 0, round((1 - available) * 60.0 / rpm, 3), RequestBucket(available, now)

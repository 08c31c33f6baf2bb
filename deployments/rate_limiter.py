"""The rate limiter: limiter actors that own the state, and the lease client inside each ingress.

Accuracy across N ingress replicas comes from one owner per account: a ``RateLimiter`` actor
(``shards`` of them, accounts spread by a stable hash) holds the token buckets of
``policies.rate_limit``. Speed comes from leases: an ingress replica takes a small slice of a
budget (``lease_fraction`` of the limit) in one actor call and admits requests against it
locally, in microseconds. Leased tokens are debited from the actor's bucket when granted, so N
replicas can never admit more than the limit; unused slices go back after ``lease_idle_s``.

State persists in the store (memory or Redis) after every change, and a restarted actor loads it
back, so a restart never resets a limit.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from cluster.config import ModelConfig, RateLimitConfig
from cluster.stores import LimitStore, StoreUnavailable, limit_store
from policies.consistent_hash import stable_hash
from policies.rate_limit import (
    BUDGETS,
    BudgetState,
    Budgets,
    RampRule,
    TIER_MULTIPLIER,
    RequestBucket,
    bounds,
    decide,
    settle,
    size_class,
)

log = logging.getLogger("ember.rate_limit")

ACTOR_NAMESPACE = "ember"


def model_bounds(model: ModelConfig, spend_tier: int) -> tuple[Budgets, Budgets]:
    """(floor, ceiling): the model's explicit limits if it has them, else its size class's; the
    spend tier scales the ceiling either way."""
    if model.limits is None:
        return bounds(size_class(model.params_billions), spend_tier)
    f, c = model.limits.floor, model.limits.ceiling
    k = TIER_MULTIPLIER[max(1, min(5, spend_tier))]
    return Budgets(f.prompt, f.uncached, f.generated), Budgets(c.prompt, c.uncached, c.generated).scaled(k)


@dataclass
class Grant:
    granted: dict[str, float] | None  # None: refused
    limits: dict[str, int]
    remaining: dict[str, int]
    retry_after_s: float = 0.0
    exhausted: str | None = None


def _encode(states: dict[str, BudgetState]) -> dict:
    return {b: [s.limit, s.usage, s.available, s.updated_at] for b, s in states.items()}


def _decode(raw: dict | None) -> dict[str, BudgetState]:
    return {b: BudgetState(*v) for b, v in (raw or {}).items()}


class RateLimiter:
    """One shard of limiter state. As a Ray actor its methods run on one event loop, so each
    read-decide-write step is atomic with respect to the others."""

    def __init__(self, config: RateLimitConfig, store_url: str, clock: Callable[[], float] = time.time,
                 store: LimitStore | None = None):
        self.config = config
        self.rule = RampRule(**config.ramp.model_dump())
        self.store = store or limit_store(store_url)
        self.clock = clock
        self._states: dict[str, dict[str, BudgetState]] = {}
        self._rpm: dict[str, RequestBucket] = {}
        self._store_down = False

    async def _load(self, scope: str) -> dict | None:
        try:
            raw = await self.store.load(scope)
            if self._store_down:
                log.warning("rate-limit store is reachable again")
                self._store_down = False
            return raw
        except StoreUnavailable:
            return self._store_failed()

    async def _save(self, scope: str, raw: dict, now: float) -> None:
        try:
            await self.store.save(scope, raw, now)
        except StoreUnavailable:
            self._store_failed()

    def _store_failed(self) -> None:
        if not self._store_down:
            log.error("rate-limit store unreachable; failing %s", self.config.on_store_error)
            self._store_down = True
        if self.config.on_store_error == "closed":
            raise StoreUnavailable("the rate-limit store is unreachable")
        return None

    async def _states_for(self, scope: str) -> dict[str, BudgetState]:
        if scope not in self._states:
            self._states[scope] = _decode(await self._load(scope))
        return self._states[scope]

    async def lease(self, scope: str, model: ModelConfig, spend_tier: int, need: dict[str, float],
                    want: dict[str, float]) -> Grant:
        """Grant ``want`` tokens if the buckets hold them, else at least ``need``, else refuse."""
        now = self.clock()
        floor, ceiling = model_bounds(model, spend_tier)
        states = await self._states_for(scope)
        d = decide(states, want, now, floor, ceiling, self.rule)
        granted = want
        if not d.allowed and want != need:
            d = decide(states, need, now, floor, ceiling, self.rule)
            granted = need
        if not d.allowed:
            return Grant(None, d.limits, d.remaining, d.retry_after_s, d.exhausted)
        self._states[scope] = d.states
        await self._save(scope, _encode(d.states), now)
        return Grant(granted, d.limits, d.remaining)

    async def give_back(self, scope: str, model: ModelConfig, spend_tier: int, tokens: dict[str, float]) -> None:
        """Return unused leased tokens (negative values charge usage beyond what was leased)."""
        if not any(tokens.values()):
            return
        now = self.clock()
        floor, ceiling = model_bounds(model, spend_tier)
        states = settle(await self._states_for(scope), tokens, now, floor, ceiling, self.rule)
        self._states[scope] = states
        await self._save(scope, _encode(states), now)

    async def take_requests(self, account: str, n: int) -> tuple[int, float]:
        """Lease up to ``n`` requests of the account-wide RPM cap: (granted, retry_after_s)."""
        now = self.clock()
        rpm = self.config.requests_per_minute
        key = account + "|*rpm"
        bucket = self._rpm.get(key)
        if bucket is None:
            raw = await self._load(key)
            bucket = RequestBucket(*raw["b"]) if raw else RequestBucket.fresh(rpm, now)
        granted, wait, bucket = bucket.take(rpm, now, n)
        self._rpm[key] = bucket
        await self._save(key, {"b": [bucket.available, bucket.updated_at]}, now)
        return granted, wait

    async def forget(self) -> None:
        """Drop the in-memory copy (tests: simulates a restart that reloads from the store)."""
        self._states.clear()
        self._rpm.clear()


# -- the ingress side ---------------------------------------------------------------------


@dataclass
class _Lease:
    balance: dict[str, float] = field(default_factory=lambda: {b: 0.0 for b in BUDGETS})
    limits: dict[str, int] = field(default_factory=dict)
    remaining: dict[str, int] = field(default_factory=dict)
    last_used: float = 0.0
    refused_until: float = 0.0
    exhausted: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class Admission:
    allowed: bool
    limits: dict[str, int]
    remaining: dict[str, int]
    reserved: dict[str, float]
    retry_after_s: float = 0.0
    exhausted: str | None = None
    scope: str = ""


class LimiterClient:
    """Leases budgets from the limiter actors and admits requests locally."""

    def __init__(self, config: RateLimitConfig, actor_for: Callable[[int], Any],
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._actor_for = actor_for  # shard index → actor handle
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self._rpm: dict[str, float] = {}  # account → leased requests left
        self._models: dict[str, tuple[ModelConfig, int]] = {}
        self._reaper: asyncio.Task | None = None

    def _actor(self, account: str):
        return self._actor_for(stable_hash(account) % self.config.shards)

    def reservation(self, prompt_tokens: int, max_tokens: int, n: int) -> dict[str, float]:
        return {
            "prompt": float(prompt_tokens),
            "uncached": float(prompt_tokens),  # settled down by the cached count
            "generated": float(min(max_tokens * n, self.config.generated_reservation)),
        }

    async def admit(self, account: str, model: ModelConfig, spend_tier: int, cost: dict[str, float]) -> Admission:
        self._ensure_reaper()
        wait = await self._take_request(account)
        scope = f"{account}|{model.id}"
        lease = self._leases.setdefault(scope, _Lease())
        self._models[scope] = (model, spend_tier)
        now = self._clock()
        lease.last_used = now
        floor, _ = model_bounds(model, spend_tier)
        limits = lease.limits or {b: int(floor.get(b)) for b in BUDGETS}
        if wait is not None:
            return Admission(False, limits, lease.remaining, {}, wait, "requests", scope)
        if not self._covers(lease, cost) and now < lease.refused_until:
            # Refused moments ago and nothing was freed since: answer here, not with another
            # actor call per rejected request.
            self._rpm[account] = self._rpm.get(account, 0.0) + 1
            return Admission(False, limits, lease.remaining, {}, round(lease.refused_until - now, 3),
                             lease.exhausted, scope)
        if not self._covers(lease, cost):
            async with lease.lock:  # one lease call in flight per scope; the rest re-check after it
                if not self._covers(lease, cost):
                    need = {b: max(0.0, cost[b] - lease.balance[b]) for b in BUDGETS}
                    # Top every budget up to one slice beyond this request.
                    chunk = self.config.lease_fraction
                    want = {b: max(need[b], cost[b] + limits[b] * chunk - lease.balance[b]) for b in BUDGETS}
                    grant: Grant = await self._actor(account).lease.remote(scope, model, spend_tier, need, want)
                    lease.limits, lease.remaining = grant.limits, grant.remaining
                    if grant.granted is None:
                        self._rpm[account] = self._rpm.get(account, 0.0) + 1  # the request slot is unused
                        # A short memory of the refusal: at most a second, so that a smaller
                        # request or a settled refund is not kept waiting long.
                        lease.refused_until = self._clock() + min(grant.retry_after_s, 1.0)
                        lease.exhausted = grant.exhausted
                        return Admission(False, grant.limits, grant.remaining, {}, grant.retry_after_s,
                                         grant.exhausted, scope)
                    for b in BUDGETS:
                        lease.balance[b] += grant.granted[b]
        for b in BUDGETS:
            lease.balance[b] -= cost[b]
        remaining = {b: max(0, int(lease.remaining.get(b, 0) + lease.balance[b])) for b in BUDGETS}
        return Admission(True, lease.limits, remaining, cost, 0.0, None, scope)

    def _covers(self, lease: _Lease, cost: dict[str, float]) -> bool:
        return all(lease.balance[b] >= cost[b] for b in BUDGETS)

    async def _take_request(self, account: str) -> float | None:
        """None if a request slot is available, else seconds to wait."""
        left = self._rpm.get(account, 0.0)
        if left >= 1:
            self._rpm[account] = left - 1
            return None
        chunk = max(1, int(self.config.requests_per_minute * self.config.lease_fraction))
        granted, wait = await self._actor(account).take_requests.remote(account, chunk)
        if granted == 0:
            return max(wait, 0.001)
        self._rpm[account] = left + granted - 1
        return None

    def settle(self, admission: Admission, usage_prompt: int, usage_cached: int, usage_generated: int) -> None:
        """Credit back what the request reserved but did not use (or debit what it overran)."""
        if not admission.allowed or not admission.reserved:
            return
        lease = self._leases.get(admission.scope)
        if lease is None:
            return
        actual = {"prompt": usage_prompt, "uncached": usage_prompt - usage_cached, "generated": usage_generated}
        for b in BUDGETS:
            lease.balance[b] += admission.reserved[b] - actual[b]
        lease.refused_until = 0.0  # tokens came back: the next request may fit

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease_idle_s / 2)
            try:
                await self.return_idle(self._clock() - self.config.lease_idle_s)
            except Exception:  # keep reaping; the next round retries
                log.exception("returning idle leases failed")

    async def return_idle(self, idle_before: float = math.inf) -> None:
        """Give unused leases back to the actors (all of them with the default argument)."""
        for scope, lease in list(self._leases.items()):
            if lease.last_used > idle_before or lease.lock.locked():
                continue
            tokens = {b: lease.balance[b] for b in BUDGETS}
            if not any(abs(v) > 1e-9 for v in tokens.values()):
                continue
            for b in BUDGETS:
                lease.balance[b] = 0.0
            model, tier = self._models[scope]
            await self._actor(scope.split("|", 1)[0]).give_back.remote(scope, model, tier, tokens)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        await self.return_idle()


def rate_limit_headers(adm: Admission, requests_per_minute: int | None = None) -> dict[str, str]:
    """Per-minute limits and what is left, plus when each budget is whole again (seconds)."""
    names = {"prompt": "Prompt", "uncached": "Cache-Adjusted-Prompt", "generated": "Generated"}
    h: dict[str, str] = {}
    if requests_per_minute is not None:
        h["X-Ratelimit-Limit-Requests"] = str(requests_per_minute)
    for b, name in names.items():
        limit = adm.limits.get(b)
        if limit is None:
            continue
        rem = min(limit, adm.remaining.get(b, limit))
        h[f"X-Ratelimit-Limit-Tokens-{name}"] = str(limit)
        h[f"X-Ratelimit-Remaining-Tokens-{name}"] = str(rem)
        h[f"X-Ratelimit-Reset-Tokens-{name}"] = f"{(limit - rem) * 60.0 / limit:.3f}" if limit else "0"
    return h

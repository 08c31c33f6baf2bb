"""The rate limiter: limiter actors that own the state, and the lease client inside each ingress.

Accuracy across N ingress replicas comes from one owner per account: a ``RateLimiter`` actor
(``shards`` of them, accounts spread by a stable hash) holds the token buckets of
``policies.rate_limit``. Speed comes from leases: an ingress replica takes a small slice of a
budget (``lease_fraction`` of the limit) in one actor call and admits requests against it
locally, in microseconds. Leased tokens are debited from the actor's bucket when granted, so N
replicas can never admit more than the limit; unused slices go back after ``lease_idle_s``.

State persists in the store after every change. Ray restarts a dead actor (max_restarts=-1):

- with ``redis://`` the restarted actor reloads each scope's state, so a restart never resets a
  limit;
- with ``memory://`` the store lived inside the dead actor and usage is forgotten, so the
  restarted actor starts every scope it has no state for EMPTY (as if the account had used its
  whole limit just before the restart; limit at the floor) and refills it at the normal rate:
  for up to a minute after a restart, accounts get less than their limit, never more.

Each scope's read-decide-write step runs under that scope's lock, so concurrent calls (an async
actor interleaves them at every await) never start from the same state or save out of order.

Ray may also retry a call whose answer was lost (max_task_retries=-1), re-running a change that
was already applied. So every changing call carries an id from the client; the actor remembers
the last ``OPS_KEPT`` ids of each scope (saved with the scope's state, so a restarted actor
remembers them too) and answers a repeated id with the first answer, changing nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
import uuid
from collections import OrderedDict
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

# Change ids remembered per scope. A retry reaches the actor right after it restarts; by then only
# the calls in flight with it can have landed on the same scope, at most a lease and a give-back
# per ingress replica (the client serializes its own), so this is ample.
OPS_KEPT = 100


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


def _reconstructed() -> bool:
    """Whether this process is a Ray actor that Ray restarted (False outside Ray)."""
    ray = sys.modules.get("ray")  # not imported: certainly not running as a Ray actor
    if ray is None or not ray.is_initialized():
        return False
    try:
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # a driver or task constructing the class directly, not an actor
        return False


class RateLimiter:
    """One shard of limiter state (see the module docstring for locking, restarts and ids)."""

    def __init__(self, config: RateLimitConfig, store_url: str, clock: Callable[[], float] = time.time,
                 store: LimitStore | None = None, restarted: bool | None = None):
        self.config = config
        self.rule = RampRule(**config.ramp.model_dump())
        self.store = store or limit_store(store_url)
        self.clock = clock
        self._states: dict[str, dict[str, BudgetState]] = {}
        self._rpm: dict[str, RequestBucket] = {}
        self._ops: dict[str, OrderedDict[str, Any]] = {}  # scope → change id → its answer
        self._locks: dict[str, asyncio.Lock] = {}
        self._store_down = False
        # None: ask Ray. A restarted actor starts scopes the store has no state for empty.
        self.restarted = _reconstructed() if restarted is None else restarted
        self._started_at = clock()
        if self.restarted:
            log.warning("rate limiter restarted: scopes without saved state start empty and refill "
                        "within a minute (with memory:// that is every scope)")

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

    def _lock(self, scope: str) -> asyncio.Lock:
        lock = self._locks.get(scope)
        if lock is None:
            lock = self._locks[scope] = asyncio.Lock()
        return lock

    async def _load_scope(self, scope: str) -> dict | None:
        """The scope's saved state, or None; also restores its remembered change ids. Called once
        per scope, under its lock, so concurrent first calls share the one load."""
        raw = await self._load(scope)
        self._ops[scope] = OrderedDict((raw or {}).get("ops", []))
        return raw

    async def _states_for(self, scope: str, floor: Budgets) -> dict[str, BudgetState]:
        """The scope's budgets; the caller holds the scope's lock."""
        if scope not in self._states:
            raw = await self._load_scope(scope)
            if raw:
                self._states[scope] = {b: BudgetState(*raw[b]) for b in BUDGETS if b in raw}
            elif self.restarted:  # usage before the restart is unknown: assume the bucket was empty
                self._states[scope] = {b: BudgetState(floor.get(b), 0.0, 0.0, self._started_at) for b in BUDGETS}
            else:
                self._states[scope] = {}  # decide() starts each budget full at the floor
        return self._states[scope]

    async def _rpm_for(self, key: str, now: float) -> RequestBucket:
        """The account's request bucket; the caller holds the key's lock."""
        if key not in self._rpm:
            raw = await self._load_scope(key)
            if raw:
                self._rpm[key] = RequestBucket(*raw["b"])
            elif self.restarted:
                self._rpm[key] = RequestBucket(0.0, self._started_at)
            else:
                self._rpm[key] = RequestBucket.fresh(self.config.requests_per_minute, now)
        return self._rpm[key]

    def _remember(self, scope: str, op: str | None, answer: Any) -> list:
        """Record a change's id and answer; the list to save with the scope's state."""
        ops = self._ops[scope]
        if op is not None:
            ops[op] = answer
            while len(ops) > OPS_KEPT:
                ops.popitem(last=False)
        return [[k, v] for k, v in ops.items()]

    async def lease(self, scope: str, model: ModelConfig, spend_tier: int, need: dict[str, float],
                    want: dict[str, float], op: str | None = None) -> Grant:
        """Grant ``want`` tokens if the buckets hold them, else at least ``need``, else refuse.
        A repeated ``op`` gets the first grant again and debits nothing."""
        floor, ceiling = model_bounds(model, spend_tier)
        async with self._lock(scope):
            now = self.clock()  # read under the lock, so saves are stamped in order
            states = await self._states_for(scope, floor)
            if op is not None and op in self._ops[scope]:
                return Grant(*self._ops[scope][op])
            d = decide(states, want, now, floor, ceiling, self.rule)
            granted = want
            if not d.allowed and want != need:
                d = decide(states, need, now, floor, ceiling, self.rule)
                granted = need
            if not d.allowed:  # nothing changed; a retry may decide afresh
                return Grant(None, d.limits, d.remaining, d.retry_after_s, d.exhausted)
            self._states[scope] = d.states
            grant = Grant(dict(granted), d.limits, d.remaining)
            ops = self._remember(scope, op, [grant.granted, grant.limits, grant.remaining])
            await self._save(scope, {**_encode(d.states), "ops": ops}, now)
            return grant

    async def give_back(self, scope: str, model: ModelConfig, spend_tier: int, tokens: dict[str, float],
                        op: str | None = None) -> None:
        """Return unused leased tokens (negative values charge usage beyond what was leased).
        A repeated ``op`` is a no-op."""
        if not any(tokens.values()):
            return
        floor, ceiling = model_bounds(model, spend_tier)
        async with self._lock(scope):
            now = self.clock()
            states = await self._states_for(scope, floor)
            if op is not None and op in self._ops[scope]:
                return
            states = settle(states, tokens, now, floor, ceiling, self.rule)
            self._states[scope] = states
            await self._save(scope, {**_encode(states), "ops": self._remember(scope, op, None)}, now)

    async def take_requests(self, account: str, n: int, op: str | None = None) -> tuple[int, float]:
        """Lease up to ``n`` requests of the account-wide RPM cap: (granted, retry_after_s).
        A repeated ``op`` gets the first answer again and takes nothing."""
        key = account + "|*rpm"
        async with self._lock(key):
            now = self.clock()
            bucket = await self._rpm_for(key, now)
            if op is not None and op in self._ops[key]:
                granted, wait = self._ops[key][op]
                return granted, wait
            granted, wait, bucket = bucket.take(self.config.requests_per_minute, now, n)
            self._rpm[key] = bucket
            # Only grants are remembered: a refusal took nothing, so a retry may decide afresh.
            ops = self._remember(key, op if granted else None, [granted, wait])
            await self._save(key, {"b": [bucket.available, bucket.updated_at], "ops": ops}, now)
            return granted, wait

    async def forget(self) -> None:
        """Drop the in-memory copy (tests: simulates a restart that reloads from the store)."""
        self._states.clear()
        self._rpm.clear()
        self._ops.clear()


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
        self._rpm_refused: dict[str, tuple[float, float]] = {}  # account → (until, retry_after_s)
        self._models: dict[str, tuple[ModelConfig, int]] = {}
        self._reaper: asyncio.Task | None = None

    def _actor(self, account: str):
        return self._actor_for(stable_hash(account) % self.config.shards)

    def reservation(self, prompt_tokens: int, max_tokens: int, n: int) -> dict[str, float]:
        """What a request may use: its prompt, and every token it may generate (``max_tokens`` is
        already capped by the context), so no burst can run past the generated-token limit and
        a refund after the request is the only correction (never a debt)."""
        return {
            "prompt": float(prompt_tokens),
            "uncached": float(prompt_tokens),  # settled down by the cached count
            "generated": float(max_tokens * n),
        }

    def refused(self, account: str, model: ModelConfig) -> Admission | None:
        """The refusal this replica gave the account's scope moments ago, if it still stands:
        checked before a request's body is parsed, so a limited account costs no CPU."""
        scope = f"{account}|{model.id}"
        now = self._clock()
        until, wait = self._rpm_refused.get(account, (0.0, 0.0))
        if now < until:
            floor, _ = model_bounds(model, 1)
            return Admission(False, {b: int(floor.get(b)) for b in BUDGETS}, {}, {}, round(until - now + wait, 3),
                             "requests", scope)
        lease = self._leases.get(scope)
        if lease is None or now >= lease.refused_until:
            return None
        return Admission(False, lease.limits, lease.remaining, {}, round(lease.refused_until - now, 3),
                         lease.exhausted, scope)

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
                    grant: Grant = await self._actor(account).lease.remote(
                        scope, model, spend_tier, need, want, op=uuid.uuid4().hex)
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
        granted, wait = await self._actor(account).take_requests.remote(account, chunk, op=uuid.uuid4().hex)
        if granted == 0:
            # Remembered briefly (never past the wait), so the next ones are refused unparsed.
            self._rpm_refused[account] = (self._clock() + min(wait, 1.0), max(0.0, wait - 1.0))
            return max(wait, 0.001)
        self._rpm_refused.pop(account, None)
        # Others may have taken or added slots during the await: count from what is there now.
        self._rpm[account] = self._rpm.get(account, 0.0) + granted - 1
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
            await self._actor(scope.split("|", 1)[0]).give_back.remote(scope, model, tier, tokens,
                                                                       op=uuid.uuid4().hex)

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

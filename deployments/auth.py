"""API keys → accounts, at the ingress.

Each ingress replica keeps a bounded cache of verified keys. What keeps it honest:

- **Revocations.** With a shared store (Redis), every revocation is published on
  ``ember:keys:revoked`` and each replica's ``KeyAuth`` listens (one background task, started with
  the replica or on first use, reconnecting with backoff). A cached key is trusted for
  ``key_cache_ttl_s`` only while that feed is provably live: the task pings through the
  subscription every quarter of ``revocation_max_delay_s``, and a pong for a ping sent at t proves
  that every revocation published before t has arrived. Otherwise (feed down, reconnecting, not yet
  subscribed) a cached key is re-read from the store after ``revocation_max_delay_s``. So a revoked
  key stops working on every replica within ``revocation_max_delay_s`` (1 s). With ``memory://``
  there is one ingress and the store tells it directly.
- **Failures are cheap and limited.** An unknown key is remembered for ``unknown_key_cache_ttl_s``
  (bounded), and after ``failed_auth_limit`` failures within ``failed_auth_window_s`` a source gets
  429 (``too_many_auth_failures``, with ``Retry-After``) without the store being touched, whatever
  key it sends, until its window allows more.
- **Store outages.** While the store is unreachable, a key this replica verified within
  ``store_outage_grace_s`` keeps working (no revocation can be written meanwhile); others get 503.

The *source* of a request is ``request.client`` (the ASGI ``scope["client"]``), which Serve's proxy
fills from the TCP connection; its uvicorn replaces it with the last untrusted
``X-Forwarded-For`` entry only when the peer is in ``FORWARDED_ALLOW_IPS`` (uvicorn's default:
127.0.0.1 and ::1). Put a load balancer's addresses there, in the proxy's environment, to count
clients instead of the balancer. Ember reads no forwarding header itself.

The demo key (``EMBER_DEMO_KEY`` when the app was built) is an ordinary key of the demo account:
seeded through the account store when a replica starts (the account is created if missing),
listed and revocable like any other. A seeded key an admin revoked is not seeded again; a start
without the variable removes the keys earlier starts seeded (never keys an admin created).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable

from starlette.requests import Request

from cluster.config import AuthConfig
from cluster.stores import SEED_REVOKED, SEED_TAKEN, AccountStore, KeyStore, StoreUnavailable, hash_key, key_id
from deployments.errors import ApiError, store_unavailable, unauthorized

log = logging.getLogger("ember.auth")

KEY_CACHE_TTL_S = AuthConfig().key_cache_ttl_s  # the default; see AuthConfig
_FEED_BACKOFF_MIN_S = 0.05
_FEED_BACKOFF_MAX_S = 2.0
_RECENT_DROPS = 10_000  # revocations remembered, to catch one that overtakes a store read

Clock = Callable[[], float]


def client_source(request: Request) -> str:
    """The address failed attempts are counted against (see the module docstring)."""
    client = request.scope.get("client")
    return str(client[0]) if client else "unknown"


def too_many_auth_failures(retry_after_s: float, what: str = "API keys") -> ApiError:
    wait = max(1, math.ceil(retry_after_s))
    return ApiError(429, f"too many invalid {what} from this address; retry in {wait} s",
                    type="rate_limit_error", code="too_many_auth_failures", headers={"Retry-After": str(wait)})


class FailureThrottle:
    """Failed attempts per source in a sliding window; at ``limit`` the source waits until the
    oldest of them leaves the window. At most ``max_sources`` sources are tracked (least recently
    failed go first), so memory is bounded whatever the traffic."""

    def __init__(self, limit: int, window_s: float, max_sources: int = 10_000, clock: Clock = time.monotonic):
        self.limit = limit
        self.window_s = window_s
        self.max_sources = max_sources
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, source: str) -> float | None:
        """Seconds until ``source`` may try again, or None if it may now."""
        log_ = self._failures.get(source)
        if log_ is None:
            return None
        now = self._clock()
        while log_ and log_[0] <= now - self.window_s:
            log_.popleft()
        if not log_:
            del self._failures[source]
            return None
        if len(log_) >= self.limit:
            return log_[0] + self.window_s - now
        return None

    def failed(self, source: str) -> None:
        log_ = self._failures.get(source)
        if log_ is None:
            log_ = self._failures[source] = deque(maxlen=self.limit)
        else:
            self._failures.move_to_end(source)
        log_.append(self._clock())
        while len(self._failures) > self.max_sources:
            self._failures.popitem(last=False)

    def __len__(self) -> int:
        return len(self._failures)


class ExpiringSet:
    """Members that expire ``ttl_s`` after they were added; at most ``max_size`` (oldest go first)."""

    def __init__(self, ttl_s: float, max_size: int, clock: Clock = time.monotonic):
        self.ttl_s = ttl_s
        self.max_size = max_size
        self._clock = clock
        self._until: OrderedDict[str, float] = OrderedDict()

    def add(self, item: str) -> None:
        if self.ttl_s <= 0:
            return
        self._until.pop(item, None)
        self._until[item] = self._clock() + self.ttl_s
        while len(self._until) > self.max_size:
            self._until.popitem(last=False)

    def __contains__(self, item: str) -> bool:
        until = self._until.get(item)
        if until is None:
            return False
        if until <= self._clock():
            del self._until[item]
            return False
        return True

    def discard(self, item: str) -> None:
        self._until.pop(item, None)

    def __len__(self) -> int:
        return len(self._until)


@dataclass(slots=True)
class _Entry:
    account: str
    verified: float  # when the store read that verified it began
    feed: int | None  # the live revocation feed's generation at that moment, or None


class KeyAuth:
    def __init__(self, keys: KeyStore, demo_key_hash: str | None = None, demo_account: str | None = None, *,
                 config: AuthConfig | None = None, accounts: AccountStore | None = None,
                 clock: Clock = time.monotonic):
        self.config = config or AuthConfig()
        self.keys = keys
        self.accounts = accounts if accounts is not None else keys.accounts
        self.demo_account = demo_account or self.config.demo_account
        self._demo_hash = demo_key_hash
        self._clock = clock
        cfg = self.config
        self._ttl = cfg.key_cache_ttl_s
        self._short = min(cfg.revocation_max_delay_s, cfg.key_cache_ttl_s)
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._unknown = ExpiringSet(cfg.unknown_key_cache_ttl_s, cfg.unknown_key_cache_size, clock)
        self.throttle = FailureThrottle(cfg.failed_auth_limit, cfg.failed_auth_window_s,
                                        cfg.failed_auth_sources, clock)
        # Revocations seen, numbered, so a store read that a revocation overtook is not cached.
        self._drops = 0
        self._dropped: OrderedDict[str, int] = OrderedDict()
        # The revocation feed (shared stores only): its task, its generation, and the live
        # subscription's (generation, send time of the last ping answered).
        self._shared = bool(getattr(keys, "shared", False))
        self._watch_task: asyncio.Task | None = None
        self._gen = 0
        self._live: tuple[int, float] | None = None
        self.feed_client_id: int | None = None  # the Redis connection of the feed, for tests
        self._seeded = False
        self._seed_task: asyncio.Task | None = None
        self._seed_retry_at = -math.inf
        keys.add_revocation_listener(self._drop)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet: everything starts on first use
        self._start()  # a replica starting: seed the demo key and subscribe now, traffic or not

    # -- the request path -----------------------------------------------------------------

    async def account(self, request: Request) -> str:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        return await self.verify(hash_key(key), client_source(request))

    async def verify(self, digest: str, source: str = "unknown") -> str:
        """The account of a key hash, for a request from ``source``; raises ApiError 401/429/503."""
        self._start()
        await self.ready()
        wait = self.throttle.retry_after(source)
        if wait is not None:
            raise too_many_auth_failures(wait)
        now = self._clock()
        entry = self._cache.get(digest)
        if entry is not None and self._usable(entry, now):
            self._cache.move_to_end(digest)
            return entry.account
        if digest in self._unknown:
            self._failed(source)
            raise unauthorized("invalid API key")
        mark, feed = self._drops, (self._live[0] if self._live is not None else None)
        try:
            account = await self.keys.account_for(digest)
        except StoreUnavailable:
            grace = self.config.store_outage_grace_s
            if entry is not None and self._clock() - entry.verified < grace and digest in self._cache:
                return entry.account  # fail open on what this replica verified recently
            if grace > 0 and digest == self._demo_hash:
                return self.demo_account  # the operator configured it: known without the store
            raise store_unavailable("API key verification") from None
        if account is None:
            self._cache.pop(digest, None)
            self._unknown.add(digest)
            self._failed(source)
            raise unauthorized("invalid API key")
        if self._dropped.get(digest, 0) <= mark:  # else revoked while we read: answer, don't cache
            self._cache[digest] = _Entry(account, now, feed)
            self._cache.move_to_end(digest)
            while len(self._cache) > self.config.key_cache_size:
                self._cache.popitem(last=False)
        return account

    def _failed(self, source: str) -> None:
        self.throttle.failed(source)
        if self.throttle.retry_after(source) is not None:
            log.warning("%d invalid API keys from %s within %g s: it gets 429 until the window allows more",
                        self.throttle.limit, source, self.throttle.window_s)

    def _usable(self, entry: _Entry, now: float) -> bool:
        age = now - entry.verified
        if age >= self._ttl:
            return False
        if not self._shared or age < self._short:
            return True
        live = self._live
        return live is not None and entry.feed == live[0] and now - live[1] < self._short

    # -- revocations ----------------------------------------------------------------------

    def _drop(self, digest: str) -> None:
        self._cache.pop(digest, None)
        self._drops += 1
        self._dropped.pop(digest, None)
        self._dropped[digest] = self._drops
        while len(self._dropped) > _RECENT_DROPS:
            self._dropped.popitem(last=False)

    def forget(self, kid: str) -> None:
        """Drop a key revoked through this replica's admin API, by its public id, at once."""
        for digest in [d for d in self._cache if key_id(d) == kid]:
            self._drop(digest)

    @property
    def feed_live(self) -> bool:
        """Whether the revocation feed is live right now (always, for a store that is not shared)."""
        live = self._live
        return not self._shared or (live is not None and self._clock() - live[1] < self._short)

    def _start(self) -> None:
        if self._seed_task is None and not self._seeded:
            self._seed_task = asyncio.get_running_loop().create_task(self.ready(), name="ember-demo-key")
        if self._shared and self._watch_task is None:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch(), name="ember-key-revocations")

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        ping_every, silent_after = self._short / 4, self._short * 3
        backoff, failures = _FEED_BACKOFF_MIN_S, 0
        while True:
            feed = self.keys.revocation_feed()  # type: ignore[attr-defined]  # shared stores have one
            try:
                await feed.open()
                self._gen += 1
                gen, self.feed_client_id = self._gen, feed.client_id
                if failures:
                    log.warning("the key revocation feed is back after %d failed attempts", failures)
                backoff, failures = _FEED_BACKOFF_MIN_S, 0
                pings: dict[str, float] = {}
                seq, next_ping, heard = 0, 0.0, loop.time()
                while True:
                    if loop.time() >= next_ping:
                        seq += 1
                        pings[str(seq)] = self._clock()
                        await feed.ping(str(seq))
                        next_ping = loop.time() + ping_every
                    event = await feed.get(timeout=max(0.005, next_ping - loop.time()))
                    if event is None:
                        if loop.time() - heard > silent_after:
                            raise StoreUnavailable("no answer on the revocation feed")
                        continue
                    heard = loop.time()
                    kind, data = event
                    if kind == "revoked":
                        self._drop(data)
                    elif kind == "pong" and data in pings:
                        sent = pings[data]
                        for token in [t for t in pings if int(t) <= int(data)]:
                            del pings[token]
                        self._live = (gen, sent)
            except asyncio.CancelledError:
                self._live = None
                await feed.close()
                raise
            except Exception as exc:  # Redis down or restarting, a dropped connection, a bug
                self._live = None
                failures += 1
                (log.warning if failures == 1 else log.debug)(
                    "the key revocation feed is down (%s); cached keys are re-read after %.1f s until it is back",
                    exc, self._short)
            await feed.close()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, _FEED_BACKOFF_MAX_S)

    async def close(self) -> None:
        for task in (self._watch_task, self._seed_task):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self._watch_task = None
        self._live = None

    # -- the demo key ---------------------------------------------------------------------

    async def ready(self) -> None:
        """Seed the demo key (or remove one seeded before, if there is none now), once per replica;
        retried at most once a second while the store is unreachable."""
        if self._seeded or self._clock() < self._seed_retry_at:
            return
        task = self._seed_task
        if task is not None and asyncio.current_task() is not task and not task.done():
            await asyncio.shield(task)
            if self._seeded or self._clock() < self._seed_retry_at:
                return
        acct, digest = self.demo_account, self._demo_hash
        record = {"id": acct, "spend_tier": None, "monthly_spend_limit_usd": None,
                  "created": int(time.time()), "demo": True}
        try:
            if digest is not None:
                outcome = await self.accounts.seed(acct, digest, record)
                if outcome == SEED_REVOKED:
                    log.warning("the demo key %s was revoked by an admin and stays revoked: set %s to a new "
                                "key to have a demo key again", key_id(digest), self.config.demo_key_env)
                elif outcome == SEED_TAKEN:
                    log.warning("the demo key %s is already a key of another account or an admin-created "
                                "key; it was left as it is", key_id(digest))
                self._unknown.discard(digest)
            else:
                await self.accounts.create(acct, record)  # the demo account exists, key or not
            for removed in await self.accounts.unseed(acct, keep=digest):
                self._drop(removed)
                log.warning("removed the demo key %s seeded by an earlier start", key_id(removed))
            self._seeded = True
        except StoreUnavailable as exc:
            self._seed_retry_at = self._clock() + 1.0
            log.warning("could not seed the demo key (%s); retrying on a later request", exc)

"""Accounts as the ingress sees them, and the usage ledger it writes.

Every completed or client-closed request becomes one usage event keyed by its request id. The
ingress writes it (not the replica, which may die after generating). ``bill`` first puts it in a
local SQLite outbox (``deployments.outbox``), durable before ``bill`` returns; a background
drainer then moves it into the ledger store, retrying with backoff while the store is down. The
outbox file is shared by the ingress processes of a node and outlives them, so events that a
crashed or redeployed ingress could not deliver (say, during a Redis outage) are delivered by the
next one to start. The store's idempotent ``record`` makes a redelivered event count once.

With ``memory://`` the ledger is the ingress process's own memory, which is not durable: whatever
reached it dies with the process. Its outbox is in memory too (``outbox_path``), since a file
would only hand one process's events to another, unrelated ledger.

Account records and spend are cached for a few seconds per replica, and spend is bumped locally
on every event, so the hot path never waits on the store for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.config import ModelConfig, StoreConfig
from cluster.stores import Stores, StoreUnavailable
from deployments.outbox import Outbox
from policies.pricing import Price, embedding_price, request_cost, spend_admits, spend_status, spend_tier

log = logging.getLogger("ember.billing")

ACCOUNT_CACHE_TTL_S = 5.0
RETRY_MIN_S, RETRY_MAX_S = 0.05, 5.0
# An idle drainer still looks this often for rows left by other processes (crashed, or whose
# lease ran out).
RESCAN_S = 30.0
BATCH = 100
CLOSE_FLUSH_S = 5.0


def outbox_path(store: StoreConfig) -> Path:
    """The outbox for a store: ``<outbox_dir or <tmp>/ember-outbox>/ledger-<hash of url>.sqlite``.

    One file per store URL, so two stores never share one (hashed: a URL may hold a password).
    ``memory://`` gets ``:memory:``, an outbox private to the process like its ledger.
    """
    if store.url == "memory://":
        return Path(":memory:")
    folder = Path(store.outbox_dir) if store.outbox_dir else Path(tempfile.gettempdir()) / "ember-outbox"
    return folder / f"ledger-{hashlib.sha256(store.url.encode()).hexdigest()[:16]}.sqlite"


_default_outbox_path = outbox_path  # Billing's parameter of that name hides it


@dataclass
class AccountView:
    id: str
    spend_tier: int
    monthly_limit_usd: float | None
    total_usd: float
    month_usd: float
    fetched_at: float

    @property
    def status(self) -> str:
        return spend_status(self.month_usd, self.monthly_limit_usd)


def price_for(model: ModelConfig, tier: str) -> tuple[Price, float]:
    """(price row, discount) for a model and service tier."""
    p = model.pricing
    if model.task == "embed":
        return embedding_price(p.embedding.input), 1.0
    row = p.priority if tier == "priority" and p.priority is not None else p.standard
    discount = p.batch_discount if tier == "batch" else 1.0
    return Price(row.input, row.cached, row.output), discount


def _today() -> str:
    return dt.datetime.now(dt.timezone.utc).date().isoformat()


class Billing:
    """Accounts (cached) and usage events (outbox, then ledger).

    ``outbox_path`` defaults to ``outbox_path(StoreConfig(url=stores.url))``. The drainer starts
    with the first ``bill``, ``flush`` or an explicit ``start()`` on a running event loop.
    """

    def __init__(self, stores: Stores, default_tier: int, fail_open: bool = True,
                 outbox_path: str | Path | None = None):
        self.stores = stores
        self.default_tier = default_tier
        self.fail_open = fail_open
        self._cache: dict[str, AccountView] = {}
        self._reserved: dict[str, float] = {}  # account -> worst-case cost of its running requests
        if outbox_path is None:
            outbox_path = _default_outbox_path(StoreConfig(url=stores.url))
        self.outbox = Outbox(outbox_path)
        self._unsaved: list[dict] = []  # events the outbox refused (disk full?): delivered from memory
        self._drainer: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one delivery pass at a time in this process
        self._closed = False

    async def account(self, account: str) -> AccountView:
        view = self._cache.get(account)
        now = time.monotonic()
        if view is not None and now - view.fetched_at < ACCOUNT_CACHE_TTL_S:
            return view
        try:
            rec = await self.stores.accounts.get(account) or {}
            total, month = await self.stores.ledger.spend(account, _today()[:7])
        except StoreUnavailable:
            if not self.fail_open:
                raise
            log.warning("store unreachable: serving %s with its last known (or default) account", account)
            if view is not None:
                view.fetched_at = now
                return view
            rec, total, month = {}, 0.0, 0.0
        view = AccountView(
            id=account,
            spend_tier=spend_tier(total, rec.get("spend_tier") or self.default_tier),
            monthly_limit_usd=rec.get("monthly_spend_limit_usd"),
            total_usd=total,
            month_usd=month,
            fetched_at=now,
        )
        self._cache[account] = view
        return view

    def forget(self, account: str) -> None:
        self._cache.pop(account, None)

    def reserve_spend(self, view: AccountView, usd: float) -> bool:
        """Reserve a running request's worst-case cost against the monthly limit (this replica's
        share: each ingress replica reserves what it runs)."""
        reserved = self._reserved.get(view.id, 0.0)
        if not spend_admits(view.month_usd, reserved, usd, view.monthly_limit_usd):
            return False
        self._reserved[view.id] = reserved + usd
        return True

    def release_spend(self, account: str, usd: float) -> None:
        left = self._reserved.get(account, 0.0) - usd
        if left > 1e-12:
            self._reserved[account] = left
        else:
            self._reserved.pop(account, None)

    def bill(self, request_id: str, account: str, model: ModelConfig, tier: str, prompt: int, cached: int,
             completion: int) -> dict:
        """Price one request and store its usage event durably; it reaches the ledger in the background.

        Synchronous and never awaits: it runs on the request's exit path, even during cancellation.
        """
        price, discount = price_for(model, tier)
        cost = request_cost(price, prompt, cached, completion, discount)
        event = {
            "request_id": request_id, "account": account, "model": model.id, "tier": tier,
            "prompt_tokens": prompt, "cached_tokens": cached, "completion_tokens": completion,
            "cost_usd": cost, "day": _today(), "ts": time.time(),
        }
        try:
            self.outbox.put(event)
        except sqlite3.Error:
            log.exception("outbox %s refused usage event %s; it is kept in memory only",
                          self.outbox.path, request_id)
            self._unsaved.append(event)
        view = self._cache.get(account)
        if view is not None:
            view.total_usd += cost
            view.month_usd += cost
        if not self._closed:
            with contextlib.suppress(RuntimeError):  # no running loop: the next start() delivers it
                self.start()
                self._wake.set()
        return event

    def backlog(self) -> int:
        """Usage events not yet in the ledger: this node's outbox (every process sharing the file)."""
        return self.outbox.count() + len(self._unsaved)

    def start(self) -> None:
        """Start the drainer if it is not running. Its first pass delivers what the outbox already
        holds, including events a crashed process left there."""
        loop = asyncio.get_running_loop()
        if self._drainer is None or self._drainer.done() or self._drainer.get_loop() is not loop:
            # Fresh primitives: an earlier loop (a notebook's asyncio.run) may have bound the old ones.
            self._wake, self._lock = asyncio.Event(), asyncio.Lock()
            self._drainer = loop.create_task(self._drain_forever(), name="ember-billing-drainer")

    async def _drain_forever(self) -> None:
        delay = RETRY_MIN_S
        while True:
            self._wake.clear()
            try:
                async with self._lock:
                    await self._deliver()
            except Exception as exc:  # mostly StoreUnavailable; the events stay in the outbox
                log.warning("usage events not delivered (%d pending); retrying in %.2fs: %s",
                            self.backlog(), delay, exc)
                # Not woken early by new events: they must not hammer a store that is down.
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            delay = RETRY_MIN_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RESCAN_S)

    async def _deliver(self, limit: int | None = None) -> None:
        """Move pending events into the ledger, oldest first; the first store error ends the pass."""
        while self._unsaved:
            await self.stores.ledger.record(self._unsaved[0])
            self._unsaved.pop(0)
        while limit is None or limit > 0:
            batch = self.outbox.pending(BATCH if limit is None else min(BATCH, limit))
            if not batch:
                return
            delivered: list[str] = []
            try:
                for event in batch:
                    await self.stores.ledger.record(event)
                    delivered.append(event["request_id"])
            finally:
                # Also on error or cancellation: the rest goes back at once, not when its lease ends.
                self.outbox.done(delivered)
                self.outbox.release(e["request_id"] for e in batch[len(delivered):])
            if limit is not None:
                limit -= len(batch)

    async def flush(self, timeout_s: float | None = None) -> None:
        """Deliver what is pending now (before reading usage, at shutdown), within ``timeout_s``.

        Never raises for an unreachable store: what is left stays in the outbox for the drainer.
        """
        if not self._closed:
            self.start()
        lock = self._lock

        async def deliver_now() -> None:
            async with lock:
                await self._deliver(limit=self.backlog())

        try:
            await asyncio.wait_for(deliver_now(), timeout_s)
        except Exception as exc:  # timeout or StoreUnavailable
            log.info("flush left %d usage events pending: %r", self.backlog(), exc)

    async def close(self, timeout_s: float = CLOSE_FLUSH_S) -> None:
        """Stop the drainer after a last flush; undelivered events stay in the outbox file for
        the next process on this node."""
        await self.flush(timeout_s)
        self._closed = True
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        left = self.backlog()
        if left:
            log.warning("%d usage events left in outbox %s for the next ingress", left, self.outbox.path)
        self.outbox.close()

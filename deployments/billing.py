"""Accounts as the ingress sees them, and the usage ledger it writes.

Every completed or client-closed request becomes one usage event keyed by its request id. The
ingress writes it (not the replica, which may die after generating) with retries, and the
store's idempotent ``record`` makes a retried write count once. Account records and spend are
cached for a few seconds per replica, and spend is bumped locally on every event, so the hot
path never waits on the store for them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass

from cluster.config import ModelConfig
from cluster.stores import Stores, StoreUnavailable
from policies.pricing import Price, request_cost, spend_status, spend_tier

log = logging.getLogger("ember.billing")

ACCOUNT_CACHE_TTL_S = 5.0
RECORD_ATTEMPTS = 8


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
    row = p.priority if tier == "priority" and p.priority is not None else p.standard
    discount = p.batch_discount if tier == "batch" else 1.0
    return Price(row.input, row.cached, row.output), discount


def _today() -> str:
    return dt.datetime.now(dt.timezone.utc).date().isoformat()


class Billing:
    def __init__(self, stores: Stores, default_tier: int, fail_open: bool = True):
        self.stores = stores
        self.default_tier = default_tier
        self.fail_open = fail_open
        self._cache: dict[str, AccountView] = {}
        self._pending: set[asyncio.Task] = set()

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

    def bill(self, request_id: str, account: str, model: ModelConfig, tier: str, prompt: int, cached: int,
             completion: int) -> dict:
        """Price one request and write its usage event in the background (retried, idempotent)."""
        price, discount = price_for(model, tier)
        cost = request_cost(price, prompt, cached, completion, discount)
        event = {
            "request_id": request_id, "account": account, "model": model.id, "tier": tier,
            "prompt_tokens": prompt, "cached_tokens": cached, "completion_tokens": completion,
            "cost_usd": cost, "day": _today(), "ts": time.time(),
        }
        view = self._cache.get(account)
        if view is not None:
            view.total_usd += cost
            view.month_usd += cost
        task = asyncio.get_running_loop().create_task(self._record(event))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return event

    async def _record(self, event: dict) -> None:
        # Retried until the store takes it: the event id makes a repeated write count once.
        delay, attempt = 0.05, 0
        while True:
            try:
                await self.stores.ledger.record(event)
                return
            except StoreUnavailable:
                attempt += 1
                if attempt == RECORD_ATTEMPTS:
                    log.error("usage event %s still not recorded after %d attempts; retrying",
                              event["request_id"], attempt)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def flush(self, timeout_s: float | None = None) -> None:
        """Wait for pending usage writes (shutdown, reads of usage)."""
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=timeout_s)

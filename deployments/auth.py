"""API keys → accounts, at the ingress, with a short per-replica cache."""

from __future__ import annotations

import logging
import math
import time

from starlette.requests import Request

from cluster.stores import KeyStore, StoreUnavailable, hash_key, key_id
from deployments.errors import store_unavailable, unauthorized

log = logging.getLogger("ember.auth")

KEY_CACHE_TTL_S = 30.0  # how long a revoked key may still work on a replica that saw it


class KeyAuth:
    def __init__(self, keys: KeyStore, demo_key_hash: str | None, demo_account: str):
        self.keys = keys
        self._demo = (demo_key_hash, demo_account) if demo_key_hash else None
        self._seeded = False
        self._cache: dict[str, tuple[str, float]] = {}

    async def account(self, request: Request) -> str:
        if not self._seeded:
            await self._seed()
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        digest = hash_key(key.strip())
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            account = await self.keys.account_for(digest)
        except StoreUnavailable:
            raise store_unavailable("API key verification") from None
        if account is None:
            raise unauthorized("invalid API key")
        # Known keys are remembered briefly, so the store is not on every request's path.
        self._cache[digest] = (account, now + KEY_CACHE_TTL_S)
        return account

    async def _seed(self) -> None:
        self._seeded = True
        if self._demo is None:
            return
        digest, account = self._demo
        self._cache[digest] = (account, math.inf)
        try:
            await self.keys.put(digest, account)
        except StoreUnavailable:
            log.warning("could not store the demo key; it works on this replica only")

    def forget(self, kid: str) -> None:
        for digest in [d for d in self._cache if key_id(d) == kid]:
            del self._cache[digest]

"""Stores for stateful parts, chosen by URI: ``memory://`` (embedded default) or ``redis://...``.

API keys are stored only as SHA-256 hashes: a leaked store does not leak keys.
"""

from __future__ import annotations

import hashlib
from typing import Protocol


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore(Protocol):
    async def put(self, key_hash: str, account: str) -> None: ...

    async def account_for(self, key_hash: str) -> str | None: ...

    async def revoke(self, key_hash: str) -> None: ...


class MemoryKeyStore:
    def __init__(self) -> None:
        self._keys: dict[str, str] = {}

    async def put(self, key_hash: str, account: str) -> None:
        self._keys[key_hash] = account

    async def account_for(self, key_hash: str) -> str | None:
        return self._keys.get(key_hash)

    async def revoke(self, key_hash: str) -> None:
        self._keys.pop(key_hash, None)


class RedisKeyStore:
    PREFIX = "ember:key:"

    def __init__(self, url: str) -> None:
        import redis.asyncio as redis

        self._r = redis.Redis.from_url(url, decode_responses=True)

    async def put(self, key_hash: str, account: str) -> None:
        await self._r.set(self.PREFIX + key_hash, account)

    async def account_for(self, key_hash: str) -> str | None:
        return await self._r.get(self.PREFIX + key_hash)

    async def revoke(self, key_hash: str) -> None:
        await self._r.delete(self.PREFIX + key_hash)

    async def close(self) -> None:
        await self._r.aclose()


def key_store(url: str) -> KeyStore:
    if url == "memory://":
        return MemoryKeyStore()
    return RedisKeyStore(url)

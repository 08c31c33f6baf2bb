"""Stores for stateful parts, chosen by URI: ``memory://`` (embedded default) or ``redis://...``.

API keys are stored only as SHA-256 hashes: a leaked store does not leak keys.
"""

from __future__ import annotations

import hashlib
from typing import Protocol


class StoreUnavailable(RuntimeError):
    """The configured store cannot be reached."""


async def _redis_call(awaitable):
    try:
        return await awaitable
    except Exception as exc:  # redis raises many kinds (connection, timeout, busy loading)
        raise StoreUnavailable(f"redis: {exc}") from exc


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

    def __init__(self, url: str, timeout_s: float = 0.5) -> None:
        import redis.asyncio as redis

        self._r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                       socket_connect_timeout=timeout_s)

    async def put(self, key_hash: str, account: str) -> None:
        await _redis_call(self._r.set(self.PREFIX + key_hash, account))

    async def account_for(self, key_hash: str) -> str | None:
        return await _redis_call(self._r.get(self.PREFIX + key_hash))

    async def revoke(self, key_hash: str) -> None:
        await _redis_call(self._r.delete(self.PREFIX + key_hash))

    async def close(self) -> None:
        await self._r.aclose()


def key_store(url: str) -> KeyStore:
    if url == "memory://":
        return MemoryKeyStore()
    return RedisKeyStore(url)


# -- rate-limit state ---------------------------------------------------------------------


class LimitStore(Protocol):
    """Persists limiter state per scope ("account|model" or "account|*rpm") as an opaque dict.

    ``save`` never lets an older state overwrite a newer one (``stamp`` orders them), so a
    restarted or zombie limiter can't roll a limit back.
    """

    async def load(self, scope: str) -> dict | None: ...

    async def save(self, scope: str, state: dict, stamp: float) -> None: ...


class MemoryLimitStore:
    def __init__(self) -> None:
        self._data: dict[str, tuple[float, dict]] = {}

    async def load(self, scope: str) -> dict | None:
        item = self._data.get(scope)
        return None if item is None else item[1]

    async def save(self, scope: str, state: dict, stamp: float) -> None:
        old = self._data.get(scope)
        if old is None or old[0] <= stamp:
            self._data[scope] = (stamp, state)


class RedisLimitStore:
    PREFIX = "ember:rl:"
    # Compare-and-set on the stamp, atomically: KEYS[1] hash, ARGV[1] stamp, ARGV[2] state JSON.
    _SAVE = """
    local old = redis.call('HGET', KEYS[1], 'stamp')
    if old and tonumber(old) > tonumber(ARGV[1]) then return 0 end
    redis.call('HSET', KEYS[1], 'stamp', ARGV[1], 'state', ARGV[2])
    return 1
    """

    def __init__(self, url: str, timeout_s: float = 0.5) -> None:
        import redis.asyncio as redis

        self._r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                       socket_connect_timeout=timeout_s)
        self._save = self._r.register_script(self._SAVE)

    async def load(self, scope: str) -> dict | None:
        import json

        raw = await _redis_call(self._r.hget(self.PREFIX + scope, "state"))
        return None if raw is None else json.loads(raw)

    async def save(self, scope: str, state: dict, stamp: float) -> None:
        import json

        await _redis_call(self._save(keys=[self.PREFIX + scope], args=[repr(stamp), json.dumps(state)]))


def limit_store(url: str) -> LimitStore:
    if url == "memory://":
        return MemoryLimitStore()
    return RedisLimitStore(url)

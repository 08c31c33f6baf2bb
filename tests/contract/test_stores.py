"""One contract suite over every store implementation: in memory and real Redis."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from cluster.stores import (
    MemoryKeyStore,
    MemoryLimitStore,
    RedisKeyStore,
    RedisLimitStore,
    StoreUnavailable,
    hash_key,
)

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(params=["memory", "redis"])
def kind(request):
    return request.param


def _run(coro):
    return asyncio.run(coro)


def _key_store(kind):
    return MemoryKeyStore() if kind == "memory" else RedisKeyStore(REDIS_URL)


def _limit_store(kind):
    return MemoryLimitStore() if kind == "memory" else RedisLimitStore(REDIS_URL)


def test_keys_are_found_by_hash_and_revocable(kind):
    async def go():
        store = _key_store(kind)
        key = "sk-" + uuid.uuid4().hex
        assert await store.account_for(hash_key(key)) is None
        await store.put(hash_key(key), "acct-1")
        assert await store.account_for(hash_key(key)) == "acct-1"
        assert await store.account_for(hash_key(key + "x")) is None
        await store.revoke(hash_key(key))
        assert await store.account_for(hash_key(key)) is None

    _run(go())


def test_hash_is_not_the_key():
    assert hash_key("sk-abc") != "sk-abc" and len(hash_key("sk-abc")) == 64


def test_limit_state_round_trips_and_never_goes_back_in_time(kind):
    async def go():
        store = _limit_store(kind)
        scope = "acct|model-" + uuid.uuid4().hex
        assert await store.load(scope) is None
        await store.save(scope, {"prompt": [1.0, 2.0, 3.0, 4.0]}, stamp=10.0)
        await store.save(scope, {"prompt": [9.0, 9.0, 9.0, 9.0]}, stamp=5.0)  # stale writer loses
        assert await store.load(scope) == {"prompt": [1.0, 2.0, 3.0, 4.0]}
        await store.save(scope, {"prompt": [5.0, 6.0, 7.0, 8.0]}, stamp=11.0)
        assert await store.load(scope) == {"prompt": [5.0, 6.0, 7.0, 8.0]}

    _run(go())


def test_unreachable_redis_raises_store_unavailable():
    async def go():
        store = RedisLimitStore("redis://127.0.0.1:1/0", timeout_s=0.2)
        with pytest.raises(StoreUnavailable):
            await store.load("x")
        with pytest.raises(StoreUnavailable):
            await store.save("x", {}, 1.0)

    _run(go())

"""The stored-response store's contract, in memory and on real Redis: scoped by account, deleted
once, kept for its TTL."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from cluster.stores import MemoryResponseStore, RedisResponseStore

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        return MemoryResponseStore()
    return RedisResponseStore(REDIS_URL, prefix=f"ember:test:{uuid.uuid4().hex}:resp:")


def test_a_response_is_its_owners_only_and_deleted_once(store):
    async def go():
        rid = "resp_" + uuid.uuid4().hex
        await store.put("alice", rid, {"response": {"id": rid}}, ttl_s=60)
        assert await store.get("alice", rid) == {"response": {"id": rid}}
        assert await store.get("bob", rid) is None
        assert not await store.delete("bob", rid)
        assert await store.delete("alice", rid)
        assert not await store.delete("alice", rid)
        assert await store.get("alice", rid) is None

    asyncio.run(go())


def test_redis_keeps_a_response_for_its_ttl():
    # Expiry itself is Redis's (and MemoryResponseStore's is tested with an injected clock in
    # tests/unit); here: the TTL is set, in milliseconds, on the account-scoped key.
    async def go():
        store = RedisResponseStore(REDIS_URL, prefix=f"ember:test:{uuid.uuid4().hex}:resp:")
        rid = "resp_" + uuid.uuid4().hex
        await store.put("alice", rid, {"x": 1}, ttl_s=30)
        ttl_ms = await store._r.pttl(f"{store.prefix}alice:{rid}")
        assert 29_000 < ttl_ms <= 30_000
        await store.delete("alice", rid)

    asyncio.run(go())

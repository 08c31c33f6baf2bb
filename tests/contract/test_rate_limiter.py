"""The limiter actor's logic and the ingress lease client, in-process, over memory and Redis stores.

Ray's actor handle is replaced by a tiny adapter with the same ``.method.remote()`` shape, so the
real RateLimiter and LimiterClient run together on one event loop with a fake clock.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from cluster.config import ModelConfig, RateLimitConfig
from cluster.stores import MemoryLimitStore, RedisLimitStore, StoreUnavailable
from deployments.rate_limiter import LimiterClient, RateLimiter

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
LIMIT = 6000  # tokens per minute in every budget, fixed (floor == ceiling)
MODEL = ModelConfig.model_validate({
    "id": "accounts/t/models/m",
    "limits": {"floor": {"prompt": LIMIT, "uncached": LIMIT, "generated": LIMIT},
               "ceiling": {"prompt": LIMIT, "uncached": LIMIT, "generated": LIMIT}},
})


class Clock:
    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        return self.t


class AsActor:
    """``obj.method.remote(...)`` → awaitable, like a Ray actor handle."""

    def __init__(self, obj) -> None:
        self._obj = obj

    def __getattr__(self, name):
        method = getattr(self._obj, name)

        class _M:
            @staticmethod
            def remote(*a, **kw):
                return method(*a, **kw)

        return _M


def _store(kind):
    return MemoryLimitStore() if kind == "memory" else RedisLimitStore(REDIS_URL)


def _setup(kind, n_clients=1, **cfg):
    clock = Clock()
    config = RateLimitConfig(**{"lease_fraction": 0.05, "requests_per_minute": 100_000, **cfg})
    limiter = RateLimiter(config, "unused", clock=clock, store=_store(kind))
    actor = AsActor(limiter)
    clients = [LimiterClient(config, lambda shard: actor, clock=clock) for _ in range(n_clients)]
    return clock, limiter, clients


COST = {"prompt": 100.0, "uncached": 100.0, "generated": 10.0}


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_many_clients_never_admit_more_than_the_limit(kind):
    async def go():
        clock, _, clients = _setup(kind, n_clients=4)
        account = "acct-" + uuid.uuid4().hex
        admitted = 0
        for i in range(200):  # 20k prompt tokens asked in one instant; 6k fit
            adm = await clients[i % 4].admit(account, MODEL, 1, COST)
            admitted += adm.allowed
            if not adm.allowed:
                assert adm.exhausted == "prompt" and adm.retry_after_s > 0
        assert admitted * 100 <= LIMIT
        assert admitted * 100 >= LIMIT * 0.8  # leases strand at most a few slices
        for c in clients:
            await c.close()
        clock.t += 60  # a minute later the bucket is whole again
        assert (await clients[0].admit(account, MODEL, 1, COST)).allowed

    asyncio.run(go())


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_settling_returns_unused_reservation(kind):
    async def go():
        _, limiter, (client,) = _setup(kind)
        account = "acct-" + uuid.uuid4().hex
        adm = await client.admit(account, MODEL, 1, {"prompt": 1000.0, "uncached": 1000.0, "generated": 500.0})
        client.settle(adm, usage_prompt=1000, usage_cached=600, usage_generated=50)
        await client.close()
        grant = await limiter.lease(f"{account}|{MODEL.id}", MODEL, 1, {"prompt": 0, "uncached": 0, "generated": 0},
                                    {"prompt": 0, "uncached": 0, "generated": 0})
        assert grant.remaining == {"prompt": LIMIT - 1000, "uncached": LIMIT - 400, "generated": LIMIT - 50}

    asyncio.run(go())


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_restarted_limiter_resumes_from_the_store(kind):
    async def go():
        clock, limiter, (client,) = _setup(kind)
        account = "acct-" + uuid.uuid4().hex
        for _ in range(30):
            await client.admit(account, MODEL, 1, COST)
        await client.close()
        await limiter.forget()  # a restart: nothing in memory
        grant = await limiter.lease(f"{account}|{MODEL.id}", MODEL, 1, {"prompt": 0}, {"prompt": 0})
        assert grant.remaining["prompt"] == LIMIT - 3000

    asyncio.run(go())


def test_rpm_cap_is_account_wide_across_clients():
    async def go():
        _, _, clients = _setup("memory", n_clients=3, requests_per_minute=20)
        results = [await clients[i % 3].admit("acct-rpm", MODEL, 1, {k: 1.0 for k in COST}) for i in range(30)]
        assert sum(a.allowed for a in results) == 20
        refused = [a for a in results if not a.allowed]
        assert refused[0].exhausted == "requests" and refused[0].retry_after_s > 0

    asyncio.run(go())


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_unreachable_store_fails_as_configured(mode, caplog):
    async def go():
        clock = Clock()
        config = RateLimitConfig(on_store_error=mode)
        limiter = RateLimiter(config, "unused", clock=clock, store=RedisLimitStore("redis://127.0.0.1:1/0", 0.2))
        client = LimiterClient(config, lambda shard: AsActor(limiter), clock=clock)
        if mode == "open":
            assert (await client.admit("acct", MODEL, 1, COST)).allowed
        else:
            with pytest.raises(StoreUnavailable):
                await client.admit("acct", MODEL, 1, COST)

    asyncio.run(go())
    assert "rate-limit store unreachable" in caplog.text


def test_refusals_carry_limits_and_do_not_call_the_actor_again_and_again():
    async def go():
        clock, limiter, (client,) = _setup("memory", requests_per_minute=1)
        other = MODEL.model_copy(update={"id": "accounts/t/models/other"})
        assert (await client.admit("acct-h", MODEL, 1, COST)).allowed
        refused = await client.admit("acct-h", other, 1, COST)  # a model this client never leased
        assert not refused.allowed and refused.exhausted == "requests"
        assert refused.limits == {"prompt": LIMIT, "uncached": LIMIT, "generated": LIMIT}

        clock2, limiter2, (c2,) = _setup("memory")
        calls = 0
        real = limiter2.lease

        async def counting(*a, **kw):
            nonlocal calls
            calls += 1
            return await real(*a, **kw)

        limiter2.lease = counting
        big = {"prompt": LIMIT * 2.0, "uncached": 1.0, "generated": 1.0}
        for _ in range(50):
            assert not (await c2.admit("acct-r", MODEL, 1, big)).allowed
        assert calls == 1

    asyncio.run(go())


def test_limits_survive_a_redis_restart(tmp_path):
    """Redis goes away (fail open keeps limiting from memory) and comes back empty (this kind of
    Redis keeps nothing on disk): the limiter writes its state back and carries on where it was."""
    import shutil
    import socket
    import subprocess
    import time

    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def start():
        proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
        for _ in range(100):
            with socket.socket() as c:
                if c.connect_ex(("127.0.0.1", port)) == 0:
                    return proc
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    async def go(proc):
        clock = Clock()
        config = RateLimitConfig(on_store_error="open", lease_fraction=0.05, requests_per_minute=100_000)
        store = RedisLimitStore(f"redis://127.0.0.1:{port}/0", timeout_s=0.3)
        limiter = RateLimiter(config, "unused", clock=clock, store=store)
        client = LimiterClient(config, lambda shard: AsActor(limiter), clock=clock)
        scope = f"acct-rr|{MODEL.id}"
        zero = {"prompt": 0.0, "uncached": 0.0, "generated": 0.0}
        for _ in range(20):
            assert (await client.admit("acct-rr", MODEL, 1, COST)).allowed
        await client.close()
        proc.terminate()
        proc.wait(10)
        # Redis is down: the limiter keeps its buckets in memory and goes on limiting.
        down = await limiter.lease(scope, MODEL, 1, zero, zero)
        assert down.remaining["prompt"] == LIMIT - 2000
        proc = start()
        # Redis is back, empty; the next change writes the state again.
        await limiter.lease(scope, MODEL, 1, {"prompt": 100.0, "uncached": 0, "generated": 0},
                            {"prompt": 100.0, "uncached": 0, "generated": 0})
        await limiter.forget()  # and a restarted limiter now resumes from it
        again = await limiter.lease(scope, MODEL, 1, zero, zero)
        assert again.remaining["prompt"] == LIMIT - 2100
        return proc

    proc = start()
    try:
        proc = asyncio.run(go(proc))
    finally:
        proc.terminate()
        proc.wait(10)

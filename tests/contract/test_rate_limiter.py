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


class YieldingActor(AsActor):
    """Like ``AsActor``, but every call yields to the event loop first, as a real actor call does,
    so concurrent callers interleave around it."""

    def __getattr__(self, name):
        method = getattr(self._obj, name)

        class _M:
            @staticmethod
            async def remote(*a, **kw):
                await asyncio.sleep(0)
                return await method(*a, **kw)

        return _M


class RetryingActor(AsActor):
    """Runs every call twice with the same arguments and answers with the second: what Ray does
    (max_task_retries=-1) when the actor dies after applying a call but before its answer got back."""

    def __getattr__(self, name):
        method = getattr(self._obj, name)

        class _M:
            @staticmethod
            async def remote(*a, **kw):
                await method(*a, **kw)
                return await method(*a, **kw)

        return _M


class GatedStore:
    """Wraps a store, with the network's delays under the test's control: a load reads the state
    and then waits for ``load_gate`` (if set) before answering; the first save after ``save_gate``
    is set waits for it before writing (``saving`` tells the test it got there)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.load_gate: asyncio.Event | None = None
        self.save_gate: asyncio.Event | None = None
        self.saving = asyncio.Event()

    async def load(self, scope):
        raw = await self.inner.load(scope)
        if self.load_gate is not None:
            await self.load_gate.wait()
        return raw

    async def save(self, scope, state, stamp):
        gate, self.save_gate = self.save_gate, None
        if gate is not None:
            self.saving.set()
            await gate.wait()
        await self.inner.save(scope, state, stamp)


def _store(kind):
    return MemoryLimitStore() if kind == "memory" else RedisLimitStore(REDIS_URL)


def _restart(kind, limiter):
    """The limiter as Ray restarts it: a new process, so a new store object (memory:// is empty)."""
    return RateLimiter(limiter.config, "unused", clock=limiter.clock, store=_store(kind), restarted=True)


def _setup(kind, n_clients=1, **cfg):
    clock = Clock()
    config = RateLimitConfig(**{"lease_fraction": 0.05, "requests_per_minute": 100_000, **cfg})
    limiter = RateLimiter(config, "unused", clock=clock, store=_store(kind))
    actor = AsActor(limiter)
    clients = [LimiterClient(config, lambda shard: actor, clock=clock) for _ in range(n_clients)]
    return clock, limiter, clients


COST = {"prompt": 100.0, "uncached": 100.0, "generated": 10.0}
ZERO = {"prompt": 0.0, "uncached": 0.0, "generated": 0.0}


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
        restarted = _restart(kind, limiter)  # a new process: nothing in memory, a new store object
        scope = f"{account}|{MODEL.id}"
        grant = await restarted.lease(scope, MODEL, 1, ZERO, ZERO)
        if kind == "redis":  # reloaded
            assert grant.remaining["prompt"] == LIMIT - 3000
        else:  # forgotten: starts empty and refills at the normal rate
            assert grant.remaining["prompt"] == 0
            clock.t += 30
            grant = await restarted.lease(scope, MODEL, 1, ZERO, ZERO)
            assert grant.remaining["prompt"] == LIMIT // 2

    asyncio.run(go())


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_an_account_at_its_limit_is_still_refused_after_a_restart(kind, caplog):
    async def go():
        clock, limiter, (client,) = _setup(kind, requests_per_minute=5)
        tok, req = "acct-tok-" + uuid.uuid4().hex, "acct-req-" + uuid.uuid4().hex
        half = {"prompt": LIMIT / 2, "uncached": 1.0, "generated": 1.0}
        tiny = {k: 1.0 for k in COST}
        assert [(await client.admit(tok, MODEL, 1, half)).allowed for _ in range(3)] == [True, True, False]
        assert [(await client.admit(req, MODEL, 1, tiny)).allowed for _ in range(6)] == [True] * 5 + [False]
        await client.close()

        restarted = _restart(kind, limiter)
        client = LimiterClient(limiter.config, lambda shard: AsActor(restarted), clock=clock)
        for _ in range(5):  # (with memory:// the request cap refuses first: every bucket starts empty)
            assert not (await client.admit(tok, MODEL, 1, half)).allowed
            refused = await client.admit(req, MODEL, 1, tiny)
            assert not refused.allowed and refused.exhausted == "requests"
        refused = await restarted.lease(f"{tok}|{MODEL.id}", MODEL, 1, half, half)  # the tokens themselves
        assert refused.granted is None and refused.exhausted == "prompt"
        clock.t += 60  # refilled at the normal rate
        assert (await client.admit(tok, MODEL, 1, half)).allowed
        assert (await client.admit(req, MODEL, 1, tiny)).allowed

    asyncio.run(go())
    assert "restarted" in caplog.text
    assert not RateLimiter(RateLimitConfig(), "memory://").restarted  # outside Ray: a first start


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_concurrent_first_leases_share_one_load(kind):
    async def go():
        store = GatedStore(_store(kind))
        limiter = RateLimiter(RateLimitConfig(), "unused", clock=Clock(), store=store)
        scope = f"acct-{uuid.uuid4().hex}|{MODEL.id}"
        cost = {"prompt": 100.0, "uncached": 0.0, "generated": 0.0}
        store.load_gate = asyncio.Event()
        calls = [asyncio.create_task(limiter.lease(scope, MODEL, 1, cost, cost)) for _ in range(2)]
        await asyncio.sleep(0.01)  # both calls are in, waiting on the first load
        store.load_gate.set()
        assert all(g.granted for g in await asyncio.gather(*calls))
        assert (await limiter.lease(scope, MODEL, 1, ZERO, ZERO)).remaining["prompt"] == LIMIT - 200

    asyncio.run(go())


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_slow_save_cannot_overwrite_a_newer_state(kind):
    async def go():
        clock = Clock()
        inner = _store(kind)
        store = GatedStore(inner)
        limiter = RateLimiter(RateLimitConfig(), "unused", clock=clock, store=store)
        scope = f"acct-{uuid.uuid4().hex}|{MODEL.id}"
        cost = {"prompt": 100.0, "uncached": 0.0, "generated": 0.0}
        store.save_gate = gate = asyncio.Event()
        first = asyncio.create_task(limiter.lease(scope, MODEL, 1, cost, cost))
        await store.saving.wait()  # the first lease is stuck saving
        second = asyncio.create_task(limiter.lease(scope, MODEL, 1, cost, cost))
        await asyncio.wait([second], timeout=0.2)  # let it get as far as it can
        gate.set()
        await asyncio.gather(first, second)
        reader = RateLimiter(RateLimitConfig(), "unused", clock=clock,
                             store=inner if kind == "memory" else RedisLimitStore(REDIS_URL))
        assert (await reader.lease(scope, MODEL, 1, ZERO, ZERO)).remaining["prompt"] == LIMIT - 200

    asyncio.run(go())


def test_concurrent_first_request_leases_share_one_load():
    async def go():
        store = GatedStore(MemoryLimitStore())
        limiter = RateLimiter(RateLimitConfig(requests_per_minute=10), "unused", clock=Clock(), store=store)
        store.load_gate = asyncio.Event()
        calls = [asyncio.create_task(limiter.take_requests("acct-first", 10)) for _ in range(2)]
        await asyncio.sleep(0.01)
        store.load_gate.set()
        assert sorted(granted for granted, _ in await asyncio.gather(*calls)) == [0, 10]

    asyncio.run(go())


def test_concurrent_requests_count_request_slots_exactly():
    async def go():
        clock = Clock()
        config = RateLimitConfig(requests_per_minute=20, lease_fraction=0.25)  # slots leased 5 at a time
        limiter = RateLimiter(config, "unused", clock=clock, store=MemoryLimitStore())
        client = LimiterClient(config, lambda shard: YieldingActor(limiter), clock=clock)
        tiny = {k: 1.0 for k in COST}
        burst = await asyncio.gather(*(client.admit("acct-burst", MODEL, 1, tiny) for _ in range(10)))
        later = [await client.admit("acct-burst", MODEL, 1, tiny) for _ in range(30)]
        assert sum(a.allowed for a in burst + later) == 20

    asyncio.run(go())


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_retried_actor_calls_apply_once(kind):
    async def go():
        clock, limiter, _ = _setup(kind)
        client = LimiterClient(limiter.config, lambda shard: RetryingActor(limiter), clock=clock)
        account = "acct-" + uuid.uuid4().hex
        adm = await client.admit(account, MODEL, 1, COST)  # leases the cost plus a slice
        client.settle(adm, usage_prompt=100, usage_cached=0, usage_generated=10)
        await client.close()  # gives the slice back
        grant = await limiter.lease(f"{account}|{MODEL.id}", MODEL, 1, ZERO, ZERO)
        assert grant.remaining == {"prompt": LIMIT - 100, "uncached": LIMIT - 100, "generated": LIMIT - 10}

        config = RateLimitConfig(requests_per_minute=10, lease_fraction=0.5)  # slots leased 5 at a time
        limiter = RateLimiter(config, "unused", clock=clock, store=_store(kind))
        client = LimiterClient(config, lambda shard: RetryingActor(limiter), clock=clock)
        account = "acct-" + uuid.uuid4().hex
        assert sum([(await client.admit(account, MODEL, 1, {k: 1.0 for k in COST})).allowed
                    for _ in range(15)]) == 10

    asyncio.run(go())


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_repeated_lease_or_give_back_id_is_a_no_op(kind):
    async def go():
        clock, limiter, _ = _setup(kind)
        scope = f"acct-{uuid.uuid4().hex}|{MODEL.id}"
        ask = {"prompt": 1000.0, "uncached": 0.0, "generated": 0.0}
        first = await limiter.lease(scope, MODEL, 1, ask, ask, op="lease-1")
        await limiter.give_back(scope, MODEL, 1, {"prompt": 400.0}, op="back-1")
        limiters = [limiter]
        if kind == "redis":  # the ids are saved with the state: a restarted actor still knows them
            limiters.append(RateLimiter(limiter.config, "unused", clock=clock, store=RedisLimitStore(REDIS_URL),
                                        restarted=True))
        for lim in limiters:
            assert await lim.lease(scope, MODEL, 1, ask, ask, op="lease-1") == first
            await lim.give_back(scope, MODEL, 1, {"prompt": 400.0}, op="back-1")
            assert (await lim.lease(scope, MODEL, 1, ZERO, ZERO)).remaining["prompt"] == LIMIT - 600

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

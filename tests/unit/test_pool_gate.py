"""The ingress's gate: Standard requests run in all of a pool's slots unless Priority is offered."""

from __future__ import annotations

import asyncio

import pytest

from cluster.config import EmberConfig
from deployments.errors import ApiError
from deployments.pool_gate import PoolGate


def _gate(priority: bool) -> PoolGate:
    model = {"id": "accounts/t/models/m", "num_replicas": 1, "engine": {"kind": "sim", "max_num_seqs": 8}}
    if priority:
        model["pricing"] = {"priority": {"input": 0.4, "output": 0.4}}
    cfg = EmberConfig.model_validate({"models": [model], "ingress": {"priority_reserve": 0.25,
                                                                     "max_queue_wait_s": 0.2}})
    return PoolGate(cfg.models[0], cfg)


async def _fill(gate: PoolGate, n: int) -> list[asyncio.Task]:
    tasks = [asyncio.create_task(gate.acquire("standard", "m")) for _ in range(n)]
    await asyncio.sleep(0.01)
    return tasks


def test_without_priority_standard_uses_every_slot():
    async def scenario():
        gate = _gate(priority=False)
        tasks = await _fill(gate, 8)
        assert all(t.done() and t.exception() is None for t in tasks)
        assert gate.in_flight == 8

    asyncio.run(scenario())


def test_with_priority_standard_leaves_the_reserve_and_priority_gets_it():
    async def scenario():
        gate = _gate(priority=True)
        tasks = await _fill(gate, 8)
        assert sum(t.done() for t in tasks) == 6  # floor(8 * 0.75); two wait for a slot
        await gate.acquire("priority", "m")  # straight into the reserve
        assert gate.in_flight == 7
        gate.release()  # a slot frees, but Standard's share is still full (6 of 6)
        await asyncio.sleep(0.01)
        assert sum(t.done() for t in tasks) == 6
        gate.release()  # one Standard request ends: the first waiter takes its slot
        await asyncio.sleep(0.01)
        assert sum(t.done() for t in tasks) == 7
        with pytest.raises(ApiError) as err:  # the last one waits past the shedding bound
            await asyncio.wait_for(tasks[-1], 2)
        assert err.value.status == 503

    asyncio.run(scenario())


def _one_slot_gate() -> PoolGate:
    model = {"id": "accounts/t/models/m", "num_replicas": 1, "engine": {"kind": "sim", "max_num_seqs": 1},
             "pricing": {"priority": {"input": 0.4, "output": 0.4}}}
    cfg = EmberConfig.model_validate({"models": [model], "ingress": {"priority_reserve": 0.0,
                                                                     "max_queue_wait_s": 30}})
    return PoolGate(cfg.models[0], cfg)


def test_a_waiter_cancelled_after_it_was_handed_a_slot_passes_it_on():
    async def scenario():
        gate = _one_slot_gate()
        await gate.acquire("standard", "m")
        b = asyncio.create_task(gate.acquire("standard", "m"))
        c = asyncio.create_task(gate.acquire("standard", "m"))
        await asyncio.sleep(0)
        assert gate.waiting() == 2
        gate.release()  # the slot goes to b...
        b.cancel()  # ...which leaves before it runs again
        await asyncio.sleep(0)
        await asyncio.wait_for(c, 1)  # c gets it at once, not after a timeout
        assert b.cancelled()
        assert gate.in_flight == 1 and gate.waiting() == 0
        gate.release()
        assert gate.in_flight == 0

    asyncio.run(scenario())


def test_cancelled_waiters_never_leak_slots():
    async def scenario():
        gate = _one_slot_gate()
        await gate.acquire("standard", "m")
        waiters = [asyncio.create_task(gate.acquire("standard", "m")) for _ in range(20)]
        await asyncio.sleep(0)
        for i, w in enumerate(waiters):
            if i % 2:
                w.cancel()
        gate.release()
        for w in waiters:
            if not w.cancelled():
                await asyncio.wait_for(w, 1)
                gate.release()
        await asyncio.sleep(0)
        assert gate.in_flight == 0 and gate.waiting() == 0

    asyncio.run(scenario())


def test_priority_goes_ahead_of_waiting_standard():
    async def scenario():
        gate = _one_slot_gate()
        await gate.acquire("standard", "m")
        std = asyncio.create_task(gate.acquire("standard", "m"))
        await asyncio.sleep(0)
        pri = asyncio.create_task(gate.acquire("priority", "m"))
        await asyncio.sleep(0)
        gate.release()
        await asyncio.wait_for(pri, 1)
        assert not std.done()
        gate.release()
        await asyncio.wait_for(std, 1)
        assert gate.in_flight == 1

    asyncio.run(scenario())

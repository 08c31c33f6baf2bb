"""Live capacity: the registry, delivery across threads, the gate following the pool, the shedding
rule while a pool grows, the ingress's metrics and the builder's autoscaling wiring."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from cluster.config import EmberConfig
from deployments.autoscaling import POLICY_POOL, queued_metric
from deployments.capacity import CapacityRegistry, Subscriber, gate_stats, publish_replicas
from deployments.errors import ApiError
from deployments.pool_gate import PoolGate
from policies.tiers import shed

MODEL_ID = "accounts/t/models/m"
DEPLOYMENT = "pool-t-models-m"


async def _turns() -> None:
    """Let woken waiters run (a handed-over slot resumes its task a few loop turns later)."""
    for _ in range(5):
        await asyncio.sleep(0)


def _config(autoscaling: dict | None = None, priority: bool = False, ingresses: int = 1, **ingress) -> EmberConfig:
    model: dict = {"id": MODEL_ID, "engine": {"kind": "sim", "max_num_seqs": 4}}
    if autoscaling is None:
        model["num_replicas"] = 1
    else:
        model["autoscaling"] = autoscaling
    if priority:
        model["pricing"] = {"priority": {"input": 0.4, "output": 0.4}}
    store = {"url": "redis://127.0.0.1:6379/15"} if ingresses > 1 else {}
    return EmberConfig.model_validate({"models": [model], "store": store, "ingress": {
        "num_replicas": ingresses, "priority_reserve": 0.25, "max_queue_wait_s": 0.2, **ingress}})


def _gate(registry: CapacityRegistry, **kw) -> PoolGate:
    cfg = _config(**kw)
    return PoolGate(cfg.models[0], cfg, registry=registry, app="app")


# -- the registry ----------------------------------------------------------------------------


def test_registry_publishes_to_matching_subscribers_only_on_change():
    reg = CapacityRegistry()
    seen, other, any_app = [], [], []
    reg.subscribe("pool-a", seen.append, app="x")
    reg.subscribe("pool-a", other.append, app="y")
    unsubscribe = reg.subscribe("pool-a", any_app.append)
    reg.publish("x", "pool-a", 2)
    reg.publish("x", "pool-a", 2)  # no change: nobody is told
    reg.publish("x", "pool-b", 5)
    assert seen == [2] and other == [] and any_app == [2]
    assert reg.get("pool-a", "x") == 2 and reg.get("pool-a", "y") is None and reg.get("pool-b") == 5
    unsubscribe()
    reg.publish("x", "pool-a", 3)
    assert seen == [2, 3] and any_app == [2]


def test_a_late_subscriber_gets_the_known_count_at_once():
    reg = CapacityRegistry()
    reg.publish("x", "pool-a", 3)
    got = []
    reg.subscribe("pool-a", got.append, app="x")
    assert got == [3]


def test_a_failing_subscriber_does_not_stop_the_others():
    reg = CapacityRegistry()
    got = []

    def broken(n):
        raise RuntimeError("boom")

    reg.subscribe("pool-a", broken)
    reg.subscribe("pool-a", got.append)
    reg.publish("x", "pool-a", 1)
    assert got == [1]


def test_publish_replicas_takes_serves_deployment_id():
    reg = CapacityRegistry()
    publish_replicas(SimpleNamespace(app_name="x", name="pool-a"), 4, reg)
    assert reg.get("pool-a", "x") == 4


def test_subscriber_hands_updates_from_another_thread_to_its_loop():
    async def scenario():
        applied: list[tuple[int, int]] = []
        sub = Subscriber(lambda n: applied.append((n, threading.get_ident())))
        t = threading.Thread(target=sub, args=(3,))
        t.start()
        t.join()
        assert applied == []  # queued on the loop, not run on the router's thread
        await asyncio.sleep(0)
        assert applied == [(3, threading.get_ident())]
        sub(4)  # on the loop's own thread: at once
        assert applied[-1][0] == 4

    asyncio.run(scenario())


# -- the gate follows the pool ------------------------------------------------------------------


def test_the_gate_starts_from_the_config_then_follows_the_router():
    reg = CapacityRegistry()
    gate = _gate(reg, autoscaling={"min_replicas": 2, "max_replicas": 4})
    assert gate.slots == 8 and gate.replicas == 2 and not gate.reported
    reg.publish("app", DEPLOYMENT, 3)
    assert gate.slots == 12 and gate.replicas == 3 and gate.reported
    reg.publish("other-app", DEPLOYMENT, 1)  # another application's pool of the same name
    assert gate.slots == 12
    gate.close()
    reg.publish("app", DEPLOYMENT, 1)
    assert gate.slots == 12


def test_slots_are_shared_between_ingress_replicas_and_never_below_one():
    reg = CapacityRegistry()
    gate = _gate(reg, autoscaling={"min_replicas": 1, "max_replicas": 4}, ingresses=3)
    assert gate.slots == 1  # 1 × 4 // 3
    reg.publish("app", DEPLOYMENT, 3)
    assert gate.slots == 4
    reg.publish("app", DEPLOYMENT, 0)
    assert gate.slots == 1


def test_growing_slots_are_handed_to_waiters_at_once():
    async def scenario():
        reg = CapacityRegistry()
        gate = _gate(reg, autoscaling={"min_replicas": 1, "max_replicas": 3})
        tasks = [asyncio.create_task(gate.acquire("standard", MODEL_ID)) for _ in range(10)]
        await _turns()
        assert sum(t.done() for t in tasks) == 4 and gate.waiting() == 6
        # The router reports from its own thread, as in Serve.
        t = threading.Thread(target=reg.publish, args=("app", DEPLOYMENT, 2))
        t.start()
        t.join()
        await _turns()
        assert sum(t.done() for t in tasks) == 8 and gate.in_flight == 8 and gate.waiting() == 2
        reg.publish("app", DEPLOYMENT, 3)
        await _turns()
        assert all(t.done() and t.exception() is None for t in tasks)
        assert gate.in_flight == 10 and gate.waiting() == 0

    asyncio.run(scenario())


def test_shrinking_never_interrupts_and_never_goes_negative():
    async def scenario():
        reg = CapacityRegistry()
        gate = _gate(reg, autoscaling={"min_replicas": 1, "max_replicas": 3, "initial_replicas": 3})
        for _ in range(12):
            await gate.acquire("standard", MODEL_ID)
        reg.publish("app", DEPLOYMENT, 1)  # two replicas drain: their streams keep their slots
        assert gate.slots == 4 and gate.in_flight == 12
        late = asyncio.create_task(gate.acquire("standard", MODEL_ID))
        await _turns()
        assert not late.done()
        for _ in range(8):
            gate.release()
        await asyncio.sleep(0)
        assert gate.in_flight == 4 and not late.done()  # still at the new size
        gate.release()
        await asyncio.wait_for(late, 1)
        assert gate.in_flight == 4
        for _ in range(4):
            gate.release()
        assert gate.in_flight == 0 and gate.waiting() == 0

    asyncio.run(scenario())


def test_priority_is_still_served_first_when_slots_grow():
    async def scenario():
        reg = CapacityRegistry()
        gate = _gate(reg, autoscaling={"min_replicas": 1, "max_replicas": 3}, priority=True)
        for _ in range(4):
            await gate.acquire("priority", MODEL_ID)  # every slot, reserve included
        std = [asyncio.create_task(gate.acquire("standard", MODEL_ID)) for _ in range(3)]
        await asyncio.sleep(0)
        pri = [asyncio.create_task(gate.acquire("priority", MODEL_ID)) for _ in range(3)]
        await asyncio.sleep(0)
        reg.publish("app", DEPLOYMENT, 2)  # 8 slots: 4 more, Standard may use 6 of them
        await _turns()
        assert all(p.done() for p in pri)  # Priority's queue first: 3 of the 4 new slots
        assert sum(s.done() for s in std) == 0  # 7 in flight > Standard's 6
        assert gate.in_flight == 7
        gate.release("priority")
        gate.release("priority")
        await _turns()
        assert sum(s.done() for s in std) == 0  # Priority ran 7 at once just now: Standard keeps to 1
        for _ in range(5):
            gate.release("priority")
        await _turns()
        assert sum(s.done() for s in std) == 1

    asyncio.run(scenario())


def test_a_fixed_gate_ignores_the_router():
    reg = CapacityRegistry()
    gate = _gate(reg, autoscaling={"min_replicas": 1, "max_replicas": 4, "gate_follows_replicas": False})
    reg.publish("app", DEPLOYMENT, 4)
    assert gate.slots == 4
    cfg = _config()
    plain = PoolGate(cfg.models[0], cfg, registry=None)  # no registry at all
    assert plain.slots == 4


# -- shedding while the pool grows --------------------------------------------------------------


def test_shed_waits_longer_while_the_pool_can_grow():
    # 4 slots, 20 ahead, 0.5 s each: 2.125 s of queue.
    at_max = shed("standard", 20, 4, 0.5, 2.0, 4.0)
    assert not at_max.admit and at_max.bound_s == 2.0
    growing = shed("standard", 20, 4, 0.5, 2.0, 4.0, scale_up_wait_s=30.0)
    assert growing.admit and growing.bound_s == 30.0
    assert shed("priority", 20, 4, 0.5, 2.0, 4.0, scale_up_wait_s=30.0).bound_s == 120.0
    assert not shed("batch", 20, 4, 0.5, 2.0, 4.0, scale_up_wait_s=30.0).admit  # Batch never buys replicas
    assert not shed("standard", 400, 4, 0.5, 2.0, 4.0, scale_up_wait_s=30.0).admit  # beyond even that
    # A short max wait never makes the growing bound shorter.
    assert shed("standard", 0, 4, 0.5, 60.0, 4.0, scale_up_wait_s=30.0).bound_s == 60.0


def test_the_gate_sheds_early_only_at_the_maximum_size():
    async def scenario():
        reg = CapacityRegistry()
        gate = _gate(reg, autoscaling={"min_replicas": 1, "max_replicas": 2, "replica_start_s": 10})
        gate.service_time_s = 1.0
        for _ in range(4):
            await gate.acquire("standard", MODEL_ID)
        waiters = [asyncio.create_task(gate.acquire("standard", MODEL_ID)) for _ in range(8)]
        await _turns()
        assert not any(w.done() for w in waiters)  # 2 s of queue: more than 0.2 s, but it grows
        reg.publish("app", DEPLOYMENT, 2)
        await _turns()
        assert sum(w.done() for w in waiters) == 4
        with pytest.raises(ApiError) as err:  # at the maximum: the 0.2 s bound holds again
            await gate.acquire("standard", MODEL_ID)
        assert err.value.status == 503 and err.value.code == "overloaded"
        for w in waiters:
            w.cancel()

    asyncio.run(scenario())


def test_a_pool_that_stops_growing_below_its_maximum_sheds_at_the_normal_bound(monkeypatch):
    """A replica budget (or a full cluster) can hold a pool below max_replicas: once no replica
    has come for replica_start_s since it filled up or last grew, requests are not held for one."""
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr("deployments.pool_gate.time", SimpleNamespace(monotonic=lambda: clock.now))

    async def waits(gate: PoolGate) -> bool:
        """Whether a request that finds the pool full is admitted to wait (cancelled after)."""
        task = asyncio.create_task(gate.acquire("standard", MODEL_ID))
        await asyncio.sleep(0)
        if task.done():
            with pytest.raises(ApiError) as err:
                task.result()
            assert err.value.status == 503 and err.value.code == "overloaded"
            return False
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return True

    async def scenario():
        reg = CapacityRegistry()
        gate = _gate(reg, autoscaling={"min_replicas": 1, "max_replicas": 3, "replica_start_s": 10})
        gate.service_time_s = 2.0  # the next request waits 0.25-0.5 s: over the 0.2 s bound, within 10 s
        for _ in range(4):
            await gate.acquire("standard", MODEL_ID)
        assert await waits(gate)  # full at t=0: replicas may be on their way
        clock.now += 9
        assert await waits(gate)
        clock.now += 2  # 11 s full, no replica came
        assert not await waits(gate)
        reg.publish("app", DEPLOYMENT, 2)  # one came after all: expect the next for 10 s more
        await asyncio.sleep(0)
        for _ in range(4):
            await gate.acquire("standard", MODEL_ID)
        clock.now += 5
        assert await waits(gate)
        clock.now += 6
        assert not await waits(gate)
        # A free slot ends the full spell; filling up again starts a new one.
        gate.release()
        await gate.acquire("standard", MODEL_ID)
        assert await waits(gate)

    asyncio.run(scenario())


def test_a_pool_at_zero_wakes_with_one_request_and_holds_the_rest():
    async def scenario():
        reg = CapacityRegistry()
        gate = _gate(reg, autoscaling={"min_replicas": 0, "max_replicas": 2, "cold_start_hold_s": 5,
                                       "replica_start_s": 20})
        assert gate.replicas == 0 and gate.slots == 1
        await gate.acquire("standard", MODEL_ID)  # the one that wakes the pool
        held = [asyncio.create_task(gate.acquire("standard", MODEL_ID)) for _ in range(3)]
        await _turns()
        assert not any(h.done() for h in held)
        reg.publish("app", DEPLOYMENT, 1)
        await _turns()
        assert all(h.done() for h in held) and gate.in_flight == 4

    asyncio.run(scenario())


def test_a_cold_pool_answers_503_with_an_honest_retry_after():
    async def scenario():
        reg = CapacityRegistry()
        gate = _gate(reg, autoscaling={"min_replicas": 0, "max_replicas": 2, "cold_start_hold_s": 0.1,
                                       "replica_start_s": 20})
        await gate.acquire("standard", MODEL_ID)
        with pytest.raises(ApiError) as err:
            await gate.acquire("standard", MODEL_ID)
        assert err.value.status == 503
        assert 15 <= int(err.value.headers["Retry-After"]) <= 20
        assert "scaled to zero" in err.value.message
        assert gate.in_flight == 1 and gate.waiting() == 0

    asyncio.run(scenario())


# -- what the ingress reports -------------------------------------------------------------------


def test_gate_stats_reports_every_pool_and_tier():
    async def scenario():
        reg = CapacityRegistry()
        gate = _gate(reg, priority=True)
        for _ in range(4):
            await gate.acquire("priority", MODEL_ID)
        gate.service_time_s = 0.01
        tasks = [asyncio.create_task(gate.acquire(t, MODEL_ID)) for t in ("priority", "standard", "standard")]
        await asyncio.sleep(0)
        stats = gate_stats({MODEL_ID: gate})
        assert stats == {queued_metric(DEPLOYMENT, "priority"): 1.0, queued_metric(DEPLOYMENT, "standard"): 2.0,
                         queued_metric(DEPLOYMENT, "batch"): 0.0}
        assert all(isinstance(v, float) for v in stats.values())
        for t in tasks:
            t.cancel()

    asyncio.run(scenario())


# -- the builder's wiring -----------------------------------------------------------------------


def test_builder_wires_ember_autoscaling_and_drains_streams():
    from cluster.builder import _ingress_scaling, _router, _scaling, pool_shutdown_timeout_s

    cfg = _config(autoscaling={"min_replicas": 1, "max_replicas": 4, "downscale_delay_s": 30})
    model = cfg.models[0]
    auto = _scaling(model.num_replicas, model.autoscaling)["autoscaling_config"]
    assert auto["min_replicas"] == 1 and auto["max_replicas"] == 4
    assert auto["upscale_delay_s"] == auto["downscale_delay_s"] == 0 and auto["metrics_interval_s"] == 1.0
    assert auto["policy"]["policy_function"] == POLICY_POOL
    assert auto["policy"]["policy_kwargs"]["downscale_delay_s"] == 30
    ingress = _ingress_scaling(cfg)["autoscaling_config"]
    assert ingress["min_replicas"] == ingress["max_replicas"] == 1 and ingress["metrics_interval_s"] == 1.0
    assert pool_shutdown_timeout_s(model, cfg) == cfg.ingress.request_timeout_s

    serve_cfg = _config(autoscaling={"min_replicas": 1, "max_replicas": 4, "policy": "serve"})
    m = serve_cfg.models[0]
    assert "policy" not in _scaling(m.num_replicas, m.autoscaling)["autoscaling_config"]
    assert _ingress_scaling(serve_cfg) == {"num_replicas": 1}
    assert _ingress_scaling(_config()) == {"num_replicas": 1}

    for policy in ("power_of_two", "affinity", "round_robin"):
        router = _router(model.routing.model_copy(update={"policy": policy}), 4)["request_router_config"]
        assert router.request_router_class.startswith("deployments.affinity_router.")

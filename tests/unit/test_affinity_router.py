"""AffinityRouter's load accounting, driven through the hooks Serve's router calls.

The router is Ray's real ``RequestRouter`` subclass; only the replicas are stand-ins (the router
reads nothing from them but their ``replica_id``). Serve's own queue-length cache keeps another
ingress's finished requests until that replica is sent another request, so an idle owner looked
full; these tests pin down that Ember's loads do not.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
from ray.serve._private.request_router.common import PendingRequest

from deployments.affinity_router import AffinityRouter
from policies.affinity import session_key
from policies.consistent_hash import HashRing, stable_hash

DEP = DeploymentID(name="pool", app_name="ember")


@dataclass
class Replica:
    replica_id: ReplicaID


def _router(ttl: float = 1.0, account_replicas: int | None = None, owner_wait_s: float = 0.0) -> AffinityRouter:
    router = AffinityRouter(deployment_id=DEP, handle_source=DeploymentHandleSource.REPLICA,
                            use_replica_queue_len_cache=True)
    router.initialize_state(load_factor=1.25, vnodes=100, replica_slots=8, peer_load_ttl_s=ttl,
                            account_replicas=account_replicas, owner_wait_s=owner_wait_s)
    return router


def _request(rid: str, session: str, args: list | None = None) -> PendingRequest:
    return PendingRequest(args=args or [], kwargs={}, metadata=RequestMetadata(request_id=rid, internal_request_id=rid,
                                                                               session_id=session))


def _key_owned_by(owner: str, nodes: list[str], prefix: str = "s") -> str:
    ring = HashRing(nodes, 100)
    for i in range(10_000):
        key = session_key("acct", header=f"{prefix}{i}")
        if ring.owner(stable_hash(key)) == owner:
            return key
    raise AssertionError("no key found")


async def _choose(router: AffinityRouter, replicas: list[Replica], rid: str, session: str,
                  args: list | None = None) -> ReplicaID:
    ranks = await router.choose_replicas(replicas, _request(rid, session, args))
    assert len(ranks) == 1 and len(ranks[0]) == 1
    return ranks[0][0].replica_id


async def _accept(router: AffinityRouter, replica: ReplicaID, rid: str, session: str, ongoing: int,
                  placed: bool = False) -> None:
    """What Serve does when a replica accepts: its ongoing count, then the routed hook. Unless it
    was ``placed`` already, the request is first placed with that replica as the only candidate."""
    if not placed:
        assert await _choose(router, [Replica(replica)], rid, session) == replica
    router.on_new_queue_len_info(replica, ongoing)
    router.on_request_routed(_request(rid, session), replica, None)


def _complete(router: AffinityRouter, replica: ReplicaID, rid: str) -> None:
    router.on_request_completed(replica, rid)
    router.decrement_queue_len_cache(replica)


def test_other_ingresses_finished_requests_stop_counting_after_the_ttl():
    async def scenario():
        router = _router(ttl=0.2)
        replicas = [Replica(ReplicaID(u, DEP)) for u in ("a", "b")]
        by_id = {"a": replicas[0], "b": replicas[1]}
        a = replicas[0].replica_id
        key = _key_owned_by("a", ["a", "b"])
        assert await _choose(router, replicas, "r1", key) == a
        # a accepts r1 and reports 9 ongoing: ours + 8 from other ingresses.
        await _accept(router, a, "r1", key, 9, placed=True)
        assert router._loads(by_id) == {"a": 9, "b": 0}
        assert (await _choose(router, replicas, "r2", key)).unique_id == "b"  # a is over the cap
        _complete(router, ReplicaID("b", DEP), "r2")  # (rejected, say)
        _complete(router, a, "r1")
        assert router._loads(by_id) == {"a": 8, "b": 0}
        await asyncio.sleep(0.3)  # the others' 8 are gone by now, and nothing said otherwise
        assert router._loads(by_id) == {"a": 0, "b": 0}
        assert router.replica_queue_len_cache.get(a) == 8  # Serve's own cache still says 8
        assert await _choose(router, replicas, "r3", key) == a

    asyncio.run(scenario())


def test_placed_requests_count_before_the_replica_accepts():
    async def scenario():
        router = _router()
        names = ["a", "b", "c", "d"]
        replicas = [Replica(ReplicaID(u, DEP)) for u in names]
        by_id = dict(zip(names, replicas))
        key = _key_owned_by("a", names)
        # Six requests of one session placed within one accept round trip: the bound still holds
        # (without counting placements, all six would see a at load 0 and go there).
        chosen = [(await _choose(router, replicas, f"r{i}", key)).unique_id for i in range(6)]
        loads = router._loads(by_id)
        assert sum(loads.values()) == 6
        assert max(loads.values()) <= 3, (chosen, loads)  # ceil(1.25 * 6 / 4) + 1
        assert chosen[:2] == ["a", "a"]
        # Accepting moves a placement into the exact count; the loads stay.
        await _accept(router, ReplicaID("a", DEP), "r0", key, loads["a"], placed=True)
        assert router._loads(by_id) == loads

    asyncio.run(scenario())


def test_own_requests_count_exactly_including_early_completions_and_rejections():
    async def scenario():
        router = _router()
        a, b = ReplicaID("a", DEP), ReplicaID("b", DEP)
        by_id = {"a": Replica(a), "b": Replica(b)}
        for i in range(5):
            await _accept(router, a, f"r{i}", "k", i + 1)  # only ours: no other ingress
        assert router._loads(by_id) == {"a": 5, "b": 0}
        # A request that finished before Serve told us it was routed never counts.
        router.on_request_completed(a, "fast")
        await _accept(router, a, "fast", "k", 6)
        assert router._loads(by_id) == {"a": 5, "b": 0}
        # A rejection on b, then the same request accepted on a: counted once, on a.
        router.on_request_completed(b, "retried")
        await _accept(router, a, "retried", "k", 6)
        assert router._loads(by_id) == {"a": 6, "b": 0}
        for i in range(5):
            router.on_request_completed(a, f"r{i}")
        router.on_request_completed(a, "retried")
        assert router._loads(by_id) == {"a": 0, "b": 0}
        router.on_replica_actor_died(a)
        assert router._loads({"b": Replica(b)}) == {"b": 0}

    asyncio.run(scenario())


@pytest.mark.parametrize("ttl", [0.0, -1.0])
def test_peer_ttl_must_be_positive_in_config(ttl):
    from pydantic import ValidationError

    from cluster.config import RoutingConfig

    with pytest.raises(ValidationError):
        RoutingConfig(peer_load_ttl_s=ttl)
    assert RoutingConfig().peer_load_ttl_s == 1.0


@pytest.mark.parametrize("k", [0, -2])
def test_account_homes_need_at_least_one_replica(k):
    from pydantic import ValidationError

    from cluster.config import RoutingConfig

    with pytest.raises(ValidationError):
        RoutingConfig(account_replicas=k)
    assert RoutingConfig().account_replicas is None and RoutingConfig(account_replicas=3).account_replicas == 3


def test_an_accounts_sessions_share_its_home_replicas():
    """Sessions placed one after another (each done before the next) stay on the account's homes."""
    router = _router(account_replicas=3)
    replicas = [Replica(ReplicaID(f"r{i}", DEP)) for i in range(8)]

    async def run() -> dict[str, set[str]]:
        used: dict[str, set[str]] = {"acct-a": set(), "acct-b": set()}
        for i in range(60):
            account = "acct-a" if i % 2 else "acct-b"
            key = session_key(account, header=f"s{i}")
            chosen = await _choose(router, replicas, f"q{i}", key)
            await _accept(router, chosen, f"q{i}", key, 1, placed=True)
            _complete(router, chosen, f"q{i}")
            used[account].add(chosen.unique_id)
        return used

    used = asyncio.run(run())
    assert len(used["acct-a"]) == 3 and len(used["acct-b"]) == 3


async def _full_owner(router: AffinityRouter) -> tuple[list[Replica], ReplicaID, str]:
    """Two replicas; five of ours on a, the key's owner: a is at the cap (ceil(1.25 * 6 / 2) + 1 = 5)."""
    names = ["a", "b"]
    replicas = [Replica(ReplicaID(u, DEP)) for u in names]
    a, key = replicas[0].replica_id, _key_owned_by("a", names)
    for i in range(5):
        await _accept(router, a, f"r{i}", key, i + 1)
    return replicas, a, key


def test_a_request_waits_for_its_full_owner_and_takes_it_when_it_frees_up():
    async def scenario():
        router = _router(owner_wait_s=2.0)
        replicas, a, key = await _full_owner(router)
        waiting = asyncio.ensure_future(_choose(router, replicas, "w", key))
        await _parked(router)
        assert not waiting.done()  # a is full, and b is not where the session's cache is
        t0 = asyncio.get_running_loop().time()
        _complete(router, a, "r0")
        assert await waiting == a
        assert asyncio.get_running_loop().time() - t0 < 0.5  # woken by the completion, not the timeout

    asyncio.run(scenario())


def test_a_request_takes_an_alternate_when_its_owner_stays_full():
    async def scenario():
        router = _router(owner_wait_s=0.15)
        replicas, a, key = await _full_owner(router)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert (await _choose(router, replicas, "w", key)).unique_id == "b"
        assert loop.time() - t0 >= 0.14
        _complete(router, ReplicaID("b", DEP), "w")  # (so that a is still at the cap)
        # Without a wait it moves at once; a request with no key never waits.
        router._owner_wait_s = 0.0
        t0 = loop.time()
        assert (await _choose(router, replicas, "w2", key)).unique_id == "b"
        router._owner_wait_s = 5.0
        assert (await _choose(router, replicas, "w3", "")).unique_id == "b"
        assert loop.time() - t0 < 0.1

    asyncio.run(scenario())


def test_a_batch_line_takes_an_alternate_at_once_and_an_interactive_request_still_waits():
    from deployments.engines.protocol import EngineRequest, SamplingParams
    from policies.tiers import ENGINE_PRIORITY

    def engine_request(tier: str) -> EngineRequest:
        return EngineRequest(request_id=tier, prompt_token_ids=[1, 2], sampling=SamplingParams(max_tokens=1),
                             priority=ENGINE_PRIORITY[tier])

    async def scenario():
        router = _router(owner_wait_s=5.0)
        replicas, a, key = await _full_owner(router)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert (await _choose(router, replicas, "b1", key, [engine_request("batch"), None])).unique_id == "b"
        assert loop.time() - t0 < 1.0  # not the 5 s owner wait
        _complete(router, ReplicaID("b", DEP), "b1")
        waiting = asyncio.ensure_future(_choose(router, replicas, "s1", key, [engine_request("standard"), None]))
        await _parked(router)
        assert not waiting.done()  # a standard request waits for its owner
        _complete(router, a, "r0")
        assert await waiting == a

    asyncio.run(scenario())


async def _parked(router: AffinityRouter) -> None:
    """Until a request waits in the router for its owner (a waiter makes the wake-up event)."""
    for _ in range(1000):
        if router._loads_changed is not None:
            return
        await asyncio.sleep(0)
    raise AssertionError("no request is waiting for its owner")


def test_a_new_session_takes_an_alternate_at_once_and_a_seen_or_marked_one_waits():
    async def scenario():
        router = _router(owner_wait_s=5.0)
        replicas, a, _ = await _full_owner(router)
        fresh = _key_owned_by("a", ["a", "b"], prefix="fresh")  # owned by the full replica, never placed
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert (await _choose(router, replicas, "n1", fresh)).unique_id == "b"  # nothing cached at a
        assert loop.time() - t0 < 1.0  # not the 5 s owner wait
        _complete(router, ReplicaID("b", DEP), "n1")
        # The same key again (the conversation's next turn): it waits for its owner.
        waiting = asyncio.ensure_future(_choose(router, replicas, "n2", fresh))
        await _parked(router)
        assert not waiting.done()
        _complete(router, a, "r0")
        assert await waiting == a
        # A fresh key that the ingress marked as continuing a session waits too.
        from deployments.engines.protocol import EngineRequest, SamplingParams

        marked = EngineRequest(request_id="m", prompt_token_ids=[1], sampling=SamplingParams(max_tokens=1),
                               returning=True)
        other = _key_owned_by("a", ["a", "b"], prefix="turn")
        waiting = asyncio.ensure_future(_choose(router, replicas, "m1", other, [marked, None]))
        await _parked(router)
        assert not waiting.done()
        _complete(router, a, "r1")
        assert await waiting == a

    asyncio.run(scenario())

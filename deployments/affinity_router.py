"""Serve ``RequestRouter`` for model pools: consistent hashing with bounded loads on the session id.

It runs inside every caller's ``DeploymentHandle`` (the ingress's), so routing costs no extra hop
and makes no blocking call. The decision is ``policies.consistent_hash.place``; this class only
feeds it the live replica set and in-flight counts and returns the placed replica as Serve's only
choice; a replica that rejects the request (backpressure) makes Serve ask again with fresh loads.

Loads are this caller's own in-flight requests per replica, counted exactly from the moment
they are placed (Serve calls ``on_request_routed`` once the replica accepts, and
``on_request_completed``; a placement not confirmed within ``_PLACING_TTL_S`` is dropped), plus
the other callers' requests on that replica as the replica last reported them (every accepted request returns the replica's ongoing
count), trusted for ``peer_load_ttl_s`` only. Serve's queue-length cache alone is not enough: it
keeps other callers' finished requests until that replica is sent another request or 10 s pass,
so with several ingress replicas an idle owner could look full and lose all its keys.

Delay scheduling: when a key's owner is at the load cap, the request waits up to ``owner_wait_s``
for the owner to free up (any completion wakes it to look again) before taking an alternate. Most
owners are full for less than one request's time, and a request that moves loses its cached
prefix, which costs more prefill than the short wait. The wait happens before placement, so no
replica ever holds more than the cap. Batch lines (the engine request's batch priority) never
wait: a batch sends a prefix group's lines together, so they keep their owner full and each
would wait the whole ``owner_wait_s`` (on an idle pool of 2 replicas this cut batch throughput by
nearly half); at an alternate a line misses its prefix once, and that replica has it after.
Nor does a new session: only a request the ingress marked as continuing one
(``EngineRequest.returning``: a named session, or a chat with turns after its first user message)
or whose key this router placed recently (among its last ``_SEEN_MAX`` keys) waits. A new
conversation has nothing cached at its owner to wait for, and under a saturated gate every such
wait holds a gate slot while another replica's engine slot stands idle (at a 4x load step on 4
replicas of 4 sequences, waits for owners of fresh keys cost about a tenth of the pool's
throughput). The mark does not depend on which ingress replica a turn reaches; the router's own
memory covers keys the mark cannot see (plain completions sharing a derived prefix).

Serve hands the chosen replica to exactly the request it was chosen for (the base class's
matching by request id, not ``FIFOMixin``'s oldest-first order): another request's owner is
no use to this one.

Every router here also publishes the pool's running replica count to
``deployments.capacity`` whenever Serve updates the replica set (``PublishesCapacity``), so the
ingress's gate sizes its slots from the live pool. ``PowerOfTwoRouter`` is Serve's default router
with only that added: what ``routing.policy: power_of_two`` uses, so that policy follows the pool
too (Ray's experimental consistent-hash router does not publish: its gate stays on the config).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict, defaultdict
from typing import List, Optional

from ray.serve._private.common import ReplicaID
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from deployments.capacity import publish_replicas
from deployments.telemetry import observe_placement

from policies.affinity import key_group
from policies.consistent_hash import DEFAULT_LOAD_FACTOR, DEFAULT_VNODES, HashRing, place
from policies.tiers import ENGINE_PRIORITY

_DONE_EARLY_MAX = 4096
_PLACING_TTL_S = 5.0
_WAIT_SLICE_S = 0.02  # a waiting request looks again at least this often
_SEEN_MAX = 65_536  # keys remembered as placed (their hashes; about 6 MB at most)


def _engine_request(pending_request: Optional[PendingRequest]) -> object:
    """The pool call's first argument, the engine request (None when there is none)."""
    args = pending_request.args if pending_request is not None else None
    return args[0] if args else None


def _is_batch(pending_request: Optional[PendingRequest]) -> bool:
    """Whether the request is a batch line."""
    return getattr(_engine_request(pending_request), "priority", None) == ENGINE_PRIORITY["batch"]


def _returning(pending_request: Optional[PendingRequest]) -> bool:
    """Whether the ingress marked the request as continuing a session (``EngineRequest.returning``)."""
    return bool(getattr(_engine_request(pending_request), "returning", False))


class PublishesCapacity:
    """Mixin for a ``RequestRouter``: publish the running replica count on every update.

    Serve calls ``update_replicas`` on the router's own loop (a separate thread by default);
    the registry is thread-safe and subscribers hand the update to their own loop.
    """

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)  # type: ignore[misc]
        publish_replicas(self._deployment_id, len(replicas))  # type: ignore[attr-defined]


class AffinityRouter(PublishesCapacity, RequestRouter):
    def initialize_state(self, load_factor: float = DEFAULT_LOAD_FACTOR, vnodes: int = DEFAULT_VNODES,
                         replica_slots: int | None = None, peer_load_ttl_s: float = 1.0,
                         account_replicas: int | None = None, owner_wait_s: float = 0.0,
                         metrics: bool = True, **_: object) -> None:
        if load_factor < 1:
            raise ValueError("load_factor must be >= 1")
        if owner_wait_s < 0:
            raise ValueError("owner_wait_s must be >= 0")
        self._owner_wait_s = float(owner_wait_s)
        # Set (and replaced) whenever loads may have dropped: wakes requests waiting for an owner.
        self._loads_changed: asyncio.Event | None = None
        self._own: dict[str, set[str]] = defaultdict(set)  # replica -> this caller's request ids
        self._peers: dict[str, tuple[float, int]] = {}  # replica -> (reported at, others' requests)
        self._peer_ttl_s = float(peer_load_ttl_s)
        # Completions that came before their on_request_routed (a request that finished while
        # Serve awaited its accept) or never had one (rejected); bounded.
        self._done_early: OrderedDict[tuple[str, str], None] = OrderedDict()
        # Placed, not yet accepted: request id -> (replica, placed at). Counted as load too, or
        # every request placed during one accept round trip would see the same stale loads.
        self._placing: dict[str, tuple[str, float]] = {}
        self._load_factor = float(load_factor)
        self._replica_slots = replica_slots
        self._account_replicas = account_replicas
        self._vnodes = int(vnodes)
        self._ring = HashRing([], self._vnodes)
        self._ring_ids: frozenset[str] = frozenset()
        self._metrics = metrics
        self._seen: OrderedDict[int, None] = OrderedDict()  # hashes of recently placed keys, oldest first

    def _ring_for(self, ids: frozenset[str]) -> HashRing:
        if ids != self._ring_ids:
            self._ring = HashRing(ids, self._vnodes)
            self._ring_ids = ids
        return self._ring

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ring = self._ring_for(frozenset(by_id))
        key = (pending_request.metadata.session_id if pending_request is not None else "") or None
        group = key_group(key) if key else None
        seen = key is not None and self._seen_before(key)
        returning = seen or _returning(pending_request)
        wait_s = self._owner_wait_s if returning and not _is_batch(pending_request) else 0.0
        deadline = time.monotonic() + wait_s
        waited = False
        while True:
            placed = place(ring, self._loads(by_id), key, load_factor=self._load_factor,
                           tie_break=random.getrandbits(16), replica_slots=self._replica_slots,
                           group=group, group_replicas=self._account_replicas)
            left = deadline - time.monotonic()
            if placed.reason in ("owner", "keyless") or left <= 0:
                break
            if pending_request is not None and pending_request.future.done():
                break  # cancelled while it waited
            waited = True
            await self._wait_for_lower_loads(min(left, _WAIT_SLICE_S))
        chosen = by_id[placed.replica]
        observe_placement(self._deployment_id.name, pending_request, placed.replica, placed.reason, waited,
                          deadline - wait_s, self._metrics)
        if pending_request is not None:
            self._placing[pending_request.metadata.internal_request_id] = (chosen.replica_id.unique_id,
                                                                           time.monotonic())
        # Only the placed replica: if Serve can't confirm its queue (a slow probe), it backs off and
        # asks again, and the placement (which already steers around full replicas) decides anew.
        # Offering "all the others" as a second rank would break affinity on every slow probe.
        return [[chosen]]

    def _seen_before(self, key: str) -> bool:
        """Whether this router placed ``key`` recently; remembers it as placed now either way."""
        h = hash(key)
        seen = h in self._seen
        if seen:
            self._seen.move_to_end(h)
        else:
            self._seen[h] = None
            if len(self._seen) > _SEEN_MAX:
                self._seen.popitem(last=False)
        return seen

    async def _wait_for_lower_loads(self, timeout: float) -> None:
        if self._loads_changed is None:
            self._loads_changed = asyncio.Event()
        try:
            await asyncio.wait_for(self._loads_changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass  # peer reports and unconfirmed placements also expire with time: look again

    def _wake_waiters(self) -> None:
        if self._loads_changed is not None:
            self._loads_changed.set()
            self._loads_changed = None

    def _placing_counts(self, now: float) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for rid, (uid, at) in list(self._placing.items()):
            if now - at > _PLACING_TTL_S:
                del self._placing[rid]  # never sent (cancelled while queued in Serve's router)
            else:
                counts[uid] += 1
        return counts

    def _loads(self, by_id: dict[str, RunningReplica]) -> dict[str, int]:
        now = time.monotonic()
        placing = self._placing_counts(now)
        loads = {}
        for uid in by_id:
            peers = self._peers.get(uid)
            others = peers[1] if peers is not None and now - peers[0] <= self._peer_ttl_s else 0
            loads[uid] = len(self._own.get(uid, ())) + placing.get(uid, 0) + others
        return loads

    def on_new_queue_len_info(self, replica_id: ReplicaID, num_ongoing_requests: int) -> None:
        super().on_new_queue_len_info(replica_id, num_ongoing_requests)
        uid = replica_id.unique_id
        # Sent with every accept (or reject): the count includes the request just accepted, and
        # any of ours accepted before on_request_routed told us: all still in _placing.
        now = time.monotonic()
        mine = len(self._own.get(uid, ())) + self._placing_counts(now).get(uid, 0)
        self._peers[uid] = (now, max(0, num_ongoing_requests - mine))
        self._wake_waiters()

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        rid = pending_request.metadata.internal_request_id
        self._placing.pop(rid, None)
        if (replica_id.unique_id, rid) in self._done_early:
            del self._done_early[(replica_id.unique_id, rid)]
            return  # already finished
        self._own[replica_id.unique_id].add(rid)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._wake_waiters()
        uid = replica_id.unique_id
        if self._placing.get(internal_request_id, ("",))[0] == uid:
            del self._placing[internal_request_id]  # rejected or failed before it was accepted
        own = self._own.get(uid)
        if own is None or internal_request_id not in own:
            self._done_early[(uid, internal_request_id)] = None
            while len(self._done_early) > _DONE_EARLY_MAX:
                self._done_early.popitem(last=False)
            return
        own.discard(internal_request_id)
        if not own:
            del self._own[uid]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._own.pop(replica_id.unique_id, None)
        self._peers.pop(replica_id.unique_id, None)


class PowerOfTwoRouter(PublishesCapacity, PowerOfTwoChoicesRequestRouter):
    """Serve's default router (power of two choices), publishing the live replica count."""


class RoundRobinRouter(PublishesCapacity, FIFOMixin, RequestRouter):
    """Baseline for benchmarks: replicas in turn, blind to sessions and load."""

    def initialize_state(self, **_: object) -> None:
        self._next = 0

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        self._next = (self._next + 1) % len(ordered)
        return [[ordered[self._next]], ordered]

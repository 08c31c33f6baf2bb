"""Serve ``RequestRouter`` for model pools: consistent hashing with bounded loads on the session id.

It runs inside every caller's ``DeploymentHandle`` (the ingress's), so routing costs no extra hop
and makes no blocking call. The decision is ``policies.consistent_hash.place``; this class only
feeds it the live replica set and in-flight counts and returns the placed replica as Serve's only
choice; a replica that rejects the request (backpressure) makes Serve ask again with fresh loads.

Loads come from Serve's replica queue-length cache: each replica's own count of ongoing
requests (all callers together), refreshed from the replicas and bumped locally on every send.
"""

from __future__ import annotations

import random
from typing import List, Optional

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from policies.consistent_hash import DEFAULT_LOAD_FACTOR, DEFAULT_VNODES, HashRing, place


class AffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, load_factor: float = DEFAULT_LOAD_FACTOR, vnodes: int = DEFAULT_VNODES,
                         replica_slots: int | None = None, **_: object) -> None:
        if load_factor < 1:
            raise ValueError("load_factor must be >= 1")
        self._load_factor = float(load_factor)
        self._replica_slots = replica_slots
        self._vnodes = int(vnodes)
        self._ring = HashRing([], self._vnodes)
        self._ring_ids: frozenset[str] = frozenset()

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
        cache = self._replica_queue_len_cache
        loads = {uid: cache.get(r.replica_id) or 0 for uid, r in by_id.items()}
        key = pending_request.metadata.session_id if pending_request is not None else ""
        chosen = by_id[place(ring, loads, key or None, load_factor=self._load_factor,
                             tie_break=random.getrandbits(16), replica_slots=self._replica_slots).replica]
        # Only the placed replica: if Serve can't confirm its queue (a slow probe), it backs off and
        # asks again, and the placement (which already steers around full replicas) decides anew.
        # Offering "all the others" as a second rank would break affinity on every slow probe.
        return [[chosen]]


class RoundRobinRouter(FIFOMixin, RequestRouter):
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

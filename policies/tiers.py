"""Service tiers: engine priority, slots kept for Priority, and load shedding.

Priority is served first on the replica (vLLM's priority scheduling: a lower number first). But
vLLM never preempts a running sequence to start a waiting one, so if Standard filled every slot
a Priority request would still wait for one to finish. The ingress therefore keeps a share of
each pool's running slots (``priority_reserve``) that only Priority may use: Standard runs in
the rest and waits for them at the ingress, not inside the engine.

The reserve follows Priority's demand: Standard leaves Priority at least its configured share
and, beyond it, Priority's peak in flight over the last ``PRIORITY_WINDOW_S`` plus one slot
(``priority_reserve_slots``), so that the operator need not size it; a model with no Priority
traffic keeps only the configured share idle.

A request is shed (503 at once, never a timeout) when the queue wait it would face exceeds a
bound: for Standard ``max_queue_wait_s`` over its usable slots; for Priority
``priority_headroom`` times that over all slots; Batch whenever it would wait at all.

Worked example: 16 slots, reserve 0.25 → Standard may use 12. With 14 requests in flight, 2
Standard waiting and a mean service time of 0.6 s, a new Standard request is 5th in line for 12
slots: it would wait about 5 × 0.6 / 12 = 0.25 s, admitted under a 0.5 s bound. A Priority
request finds 2 free slots and starts at once.

Growing pools: while the pool runs fewer replicas than its maximum (an autoscaled pool that is
still scaling up, or will), more slots are on the way, so Standard and Priority wait for them up
to ``scale_up_wait_s`` (about the time a new replica takes to start: ``replica_start_s`` in the
model's autoscaling config) instead of ``max_queue_wait_s``; Priority still gets
``priority_headroom`` times that. Load is shed early only at the pool's maximum size. Batch does
not make a pool grow (it fills idle capacity), so it is still refused whenever it would wait.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Tier = Literal["priority", "standard", "batch"]
ENGINE_PRIORITY: dict[str, int] = {"priority": 0, "standard": 1, "batch": 2}
PRIORITY_WINDOW_S = 30.0  # how long Priority's peak in flight widens the reserve


@dataclass(frozen=True, slots=True)
class ShedDecision:
    admit: bool
    expected_wait_s: float
    bound_s: float


def usable_slots(tier: Tier, slots: int, priority_reserve: float, batch_headroom: float = 0.0) -> int:
    """Slots a tier may run in. Batch also leaves ``batch_headroom`` of them free, so that an
    interactive request arriving finds a slot at once rather than behind a batch line.

    Example: 32 slots, no Priority reserve, headroom 0.25: Standard may use 32, Batch 24.
    """
    if tier == "priority":
        return slots
    if tier == "batch":
        return max(1, math.floor(slots * (1 - priority_reserve - batch_headroom) + 1e-9))
    return max(1, math.floor(slots * (1 - priority_reserve) + 1e-9))


def priority_reserve_slots(slots: int, priority_reserve: float, recent_priority_peak: int) -> int:
    """Slots Standard leaves to Priority: the configured share, or more when Priority has
    recently needed more: its peak in flight over the last window plus one, so that a Priority
    request arriving on top of that peak still finds a free slot instead of waiting for one to
    end. Standard always keeps at least one slot.

    Worked example: 16 slots, reserve 0.25 → 4 reserved. Priority peaked at 6 in flight over the
    last window → 7 reserved, Standard runs in 9. Priority at 15 → 15 reserved (Standard keeps 1).
    """
    static = slots - usable_slots("standard", slots, priority_reserve)
    dynamic = recent_priority_peak + 1 if recent_priority_peak > 0 else 0
    return max(0, min(slots - 1, max(static, dynamic)))


def expected_wait_s(ahead: int, slots: int, service_time_s: float) -> float:
    """Wait for a request with ``ahead`` requests in flight or queued before it."""
    return max(0, ahead + 1 - slots) * service_time_s / max(1, slots)


def shed(tier: Tier, ahead: int, slots: int, service_time_s: float, max_queue_wait_s: float,
         priority_headroom: float, priority_reserve: float = 0.0,
         scale_up_wait_s: float | None = None, batch_headroom: float = 0.0) -> ShedDecision:
    """Admit or refuse; ``scale_up_wait_s`` (not None) says the pool is below its maximum size
    and may wait that long for the replicas on their way (see the module doc)."""
    usable = usable_slots(tier, slots, priority_reserve, batch_headroom)
    wait = expected_wait_s(ahead, usable, service_time_s)
    base = max_queue_wait_s if scale_up_wait_s is None else max(max_queue_wait_s, scale_up_wait_s)
    if tier == "priority":
        bound = base * priority_headroom
    elif tier == "batch":
        bound = 0.0
    else:
        bound = base
    return ShedDecision(wait <= bound, wait, bound)

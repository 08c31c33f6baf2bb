"""Service tiers: engine priority and load shedding.

Priority is served first on the replica (vLLM's priority scheduling: a lower number first) and
may use headroom that Standard may not. A pool sheds load when the queue wait it would impose
exceeds a bound: Standard first, Priority only at ``priority_headroom`` times that bound, Batch
as soon as anything waits. Shedding is a 503 at once, never a timeout.

Worked example: a pool with 2 replicas × 8 sequences (16 slots), 40 requests in flight and a
mean service time of 0.5 s has 24 waiting, so a new request would wait about 24 × 0.5 / 16 =
0.75 s. With a bound of 0.5 s, Standard is shed; with headroom 4 (2 s), Priority is admitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Tier = Literal["priority", "standard", "batch"]
ENGINE_PRIORITY: dict[str, int] = {"priority": 0, "standard": 1, "batch": 2}


@dataclass(frozen=True, slots=True)
class ShedDecision:
    admit: bool
    expected_wait_s: float
    bound_s: float


def expected_wait_s(in_flight: int, slots: int, service_time_s: float) -> float:
    waiting = max(0, in_flight + 1 - slots)
    return waiting * service_time_s / max(1, slots)


def shed(tier: Tier, in_flight: int, slots: int, service_time_s: float, max_queue_wait_s: float,
         priority_headroom: float) -> ShedDecision:
    wait = expected_wait_s(in_flight, slots, service_time_s)
    if tier == "priority":
        bound = max_queue_wait_s * priority_headroom
    elif tier == "batch":
        bound = 0.0
    else:
        bound = max_queue_wait_s
    return ShedDecision(wait <= bound, wait, bound)

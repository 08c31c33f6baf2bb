"""The ingress's gate in front of each model pool: Priority's reserved slots and load shedding.

The rules are in ``policies/tiers.py``; this module holds the per-pool counters and the queue of
Standard requests waiting for a slot of their share.
"""

from __future__ import annotations

import asyncio
import collections

from cluster.config import EmberConfig, ModelConfig
from deployments.errors import ApiError
from policies.tiers import shed, usable_slots


class PoolGate:
    """This ingress's gate in front of one pool (see policies/tiers.py).

    Each ingress replica owns an equal share of the pool's running slots. Standard requests run in
    all but the Priority reserve and wait here, in arrival order, for a slot of their share;
    Priority goes straight through. Nobody waits longer than the shedding rule allows.
    """

    def __init__(self, model: ModelConfig, config: EmberConfig):
        replicas = model.num_replicas or (model.autoscaling.min_replicas if model.autoscaling else 1) or 1
        ing = config.ingress
        ingresses = ing.num_replicas or (ing.autoscaling.min_replicas if ing.autoscaling else 1) or 1
        self.slots = max(1, replicas * model.engine.max_num_seqs // ingresses)
        self.ingress = ing
        # Slots held back for Priority; a model that offers no Priority tier keeps none idle.
        self.reserve = ing.priority_reserve if model.pricing.priority is not None else 0.0
        self.in_flight = 0
        self.service_time_s = 0.5  # prior until the first request finishes
        self._waiting: collections.deque[asyncio.Future] = collections.deque()

    def observe(self, seconds: float) -> None:
        self.service_time_s += 0.1 * (seconds - self.service_time_s)

    async def acquire(self, tier: str, model_id: str) -> None:
        ing = self.ingress
        ahead = self.in_flight + (len(self._waiting) if tier != "priority" else 0)
        d = shed(tier, ahead, self.slots, self.service_time_s, ing.max_queue_wait_s,  # type: ignore[arg-type]
                 ing.priority_headroom, self.reserve)
        if not d.admit:
            raise ApiError(503, f"{model_id} is overloaded (expected queue wait {d.expected_wait_s:.2f} s); "
                                "retry shortly", type="service_unavailable", code="overloaded",
                           headers={"Retry-After": "1"})
        usable = usable_slots(tier, self.slots, self.reserve)  # type: ignore[arg-type]
        if self.in_flight >= usable or (tier != "priority" and self._waiting):
            fut = asyncio.get_running_loop().create_future()
            self._waiting.append(fut)
            try:
                # The estimate said it fits the bound; twice the bound is the hard stop.
                await asyncio.wait_for(fut, timeout=max(0.05, 2 * d.bound_s))
            except asyncio.TimeoutError:
                raise ApiError(503, f"{model_id} is overloaded; retry shortly", type="service_unavailable",
                               code="overloaded", headers={"Retry-After": "1"}) from None
            finally:
                if fut in self._waiting:
                    self._waiting.remove(fut)
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        usable = usable_slots("standard", self.slots, self.reserve)
        while self._waiting and self.in_flight < usable:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                break


class ReleaseSlot:
    """A Starlette background task that frees a streamed request's slot when the stream ends."""

    def __init__(self, load: PoolGate):
        self.load = load

    async def __call__(self) -> None:
        self.load.release()

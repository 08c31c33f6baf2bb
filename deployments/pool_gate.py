"""The ingress's gate in front of each model pool: slots, Priority's share and load shedding.

The rules are in ``policies/tiers.py``; this module holds the per-pool counters and the queues of
requests waiting for a slot.

A slot is handed over, never left free for a moment: ``release`` gives the freed slot straight to
the next waiter that may use it (Priority's queue first), and counts it as taken before that
waiter even resumes. A waiter that is cancelled or times out after it was handed a slot passes
the slot on, so no wakeup is ever lost and ``in_flight`` always equals the slots held.
"""

from __future__ import annotations

import asyncio
import collections

from cluster.config import EmberConfig, ModelConfig
from deployments.errors import overloaded
from policies.tiers import shed, usable_slots


class PoolGate:
    """This ingress's gate in front of one pool (see policies/tiers.py).

    Each ingress replica owns an equal share of the pool's running slots. Standard requests run in
    all but the Priority reserve and wait here, in arrival order, for a slot of their share;
    Priority waits only when every slot is taken, and goes ahead of any waiting Standard request.
    Nobody waits longer than the shedding rule allows.
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
        self._queues: dict[str, collections.deque[asyncio.Future]] = {
            "priority": collections.deque(), "standard": collections.deque()}

    def observe(self, seconds: float) -> None:
        self.service_time_s += 0.1 * (seconds - self.service_time_s)

    def waiting(self, tier: str | None = None) -> int:
        queues = self._queues.values() if tier is None else [self._queue(tier)]
        return sum(1 for q in queues for f in q if not f.done())

    def state(self) -> dict:
        return {"slots": self.slots, "in_flight": self.in_flight, "waiting": self.waiting(),
                "waiting_priority": self.waiting("priority")}

    def _queue(self, tier: str) -> collections.deque[asyncio.Future]:
        return self._queues["priority" if tier == "priority" else "standard"]

    def _usable(self, tier: str) -> int:
        return usable_slots("priority" if tier == "priority" else "standard", self.slots, self.reserve)

    async def acquire(self, tier: str, model_id: str) -> None:
        """Take a slot (waiting within the shedding bound) or raise 503 ``overloaded``."""
        ing = self.ingress
        ahead = self.in_flight + self.waiting("priority") + (self.waiting("standard") if tier != "priority" else 0)
        d = shed(tier, ahead, self.slots, self.service_time_s, ing.max_queue_wait_s,  # type: ignore[arg-type]
                 ing.priority_headroom, self.reserve)
        if not d.admit:
            raise overloaded(model_id, d.expected_wait_s)
        queue = self._queue(tier)
        if self.in_flight < self._usable(tier) and not self.waiting("priority") and (
                tier == "priority" or not self.waiting("standard")):
            self.in_flight += 1
            return
        fut = asyncio.get_running_loop().create_future()
        queue.append(fut)
        try:
            # The estimate said it fits the bound; twice the bound is the hard stop.
            async with asyncio.timeout(max(0.05, 2 * d.bound_s)):
                await asyncio.shield(fut)
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a slot just as it gave up: pass it on
            else:
                fut.cancel()
            if isinstance(exc, TimeoutError):
                raise overloaded(model_id) from None
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._hand_over()

    def _hand_over(self) -> None:
        while True:
            fut = self._next_waiter()
            if fut is None:
                return
            self.in_flight += 1
            fut.set_result(None)

    def _next_waiter(self) -> asyncio.Future | None:
        for tier in ("priority", "standard"):
            queue = self._queue(tier)
            while queue and queue[0].done():
                queue.popleft()  # gave up while waiting
            if queue and self.in_flight < self._usable(tier):
                return queue.popleft()
        return None

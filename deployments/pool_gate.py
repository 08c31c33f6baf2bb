"""The ingress's gate in front of each model pool: slots, Priority's share and load shedding.

The rules are in ``policies/tiers.py``; this module holds the per-pool counters and the queues of
requests waiting for a slot.

A slot is handed over, never left free for a moment: ``release`` gives the freed slot straight to
the next waiter that may use it (Priority's queue first), and counts it as taken before that
waiter even resumes. A waiter that is cancelled or times out after it was handed a slot passes
the slot on, so no wakeup is ever lost and ``in_flight`` always equals the slots held.

Capacity follows the pool. The gate's slots are ``running replicas × max_num_seqs // ingress
replicas`` (at least 1), with the running replicas as the pool's request router last saw them
(``deployments.capacity``: Ember's routers publish every change of the replica set, within a
second of a replica joining or leaving). Until the router has reported, the config's count is
the prior (``num_replicas``, or autoscaling ``initial_replicas``/``min_replicas``). When slots
grow, waiting requests get the new slots at once (Priority's queue first); when they shrink,
nobody is interrupted: new requests wait until ``in_flight`` falls below the new size. The number
of ingress replicas is the config's (the live count is not known here).

Within a tier, waiting requests are ordered by fair share (``ingress.queue_order: vtc``,
``policies.fair_share``): the next slot goes to the waiting request of the account that has been
served the fewest weighted tokens, arrival order within an account. Each request is charged its
estimate (prompt + ``max_tokens × n``) when it gets a slot, and ``correct`` settles the difference
with its real usage when it ends. ``fcfs`` orders by arrival alone. Each tier keeps a heap of
waiting accounts, so handing over a slot costs O(log accounts), with no scan of the queue (but
see the headroom below).

Under fair share the order alone leaves a quiet account waiting for the next slot to end, which
behind a noisy account's requests of equal length can take most of a request's duration. So the
engines run a little more than ``max_num_seqs`` (``engine.fair_share_headroom``, a quarter by
default), and when every slot is taken, an interactive request of an account whose demand (slots
held plus requests waiting) is less than another account holds (its max-min fair share,
``policies.fair_share.under_fair_share``) runs in that headroom at once, Priority's waiters first,
the least served first. An account with a backlog never does (it is served in VTC order in the
slots), nor does batch. A slot that frees while the headroom is in use is not refilled until
``in_flight`` is back under the slots, so the headroom drains as requests end, and the pool's
capacity for everyone else is unchanged. Standard requests in the headroom never take Priority's
reserve: Priority's ceiling rises by as many. An account qualifies only while another holds
strictly more than it wants, so light accounts arriving one after another cannot keep a
backlogged account that holds as little from its turn. The pool's router is told each engine's
real limit (``max_num_seqs`` plus the headroom), so a request in the headroom goes to an engine
with room. Deciding who may use the headroom scans the waiting accounts and the holders: it is
asked only while every slot is taken.

While the pool runs fewer replicas than it may (``autoscaling.max_replicas``), requests wait for
the replicas on their way up to ``replica_start_s`` rather than ``max_queue_wait_s``
(``policies.tiers.shed``): load is shed early only at the maximum size, or once no replica has
come for ``replica_start_s`` since the pool filled up or last grew (``_scale_up_wait_s``). Then
none is on its way: a replica budget shared with other models, or a cluster out of room, holds
the pool where it is, and the tier and shedding rules decide who waits. The wait a scale-up
allows shrinks as that time passes, so no request is told to wait for a replica that is late. A pool with no running
replica (scaled to zero) lets one request through, which wakes it (Serve's cold start sees it in
the handle), and holds the rest up to ``cold_start_hold_s``; then 503 with a Retry-After of the
start time still expected.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import math
import time
import weakref
from collections.abc import Callable

from cluster.config import EmberConfig, ModelConfig
from deployments.capacity import REGISTRY, CapacityRegistry, Subscriber, current_app_name
from deployments.errors import overloaded
from policies.fair_share import TokenWeights, VirtualTokenCounter, under_fair_share
from policies.tiers import PRIORITY_WINDOW_S, priority_reserve_slots, shed, usable_slots

_DEFAULT = object()
DEFAULT_REPLICA_START_S = 30.0  # a fixed-size pool's replicas are restarts, not scale-ups


class TierQueue:
    """One tier's waiting requests, by account, in fair-share order (one account under FCFS).

    Invariant: every waiter not yet done is counted in ``vtc.waiting`` of its key; done waiters
    (given up) may still sit in their account's deque and are skipped.
    """

    def __init__(self, weights: TokenWeights, by_account: bool):
        self.vtc = VirtualTokenCounter(weights)
        self.by_account = by_account
        self.count = 0  # waiters not yet done
        self._waiters: dict[str, collections.deque[tuple[asyncio.Future, int, int]]] = {}

    def key(self, account: str) -> str:
        return account if self.by_account else ""

    def ahead(self, account: str) -> int:
        """About how many waiters of this tier a new request of ``account`` will wait behind: all of
        them under FCFS; under fair share, a round of every waiting account per request of its own
        already waiting (one request of each account is served in turn once counters are level)."""
        if not self.by_account:
            return self.count
        own = self.vtc.waiting(account)
        return min(self.count, (own + 1) * max(1, self.vtc.waiting_accounts()))

    def push(self, account: str, fut: asyncio.Future, input_tokens: int, output_tokens: int) -> None:
        key = self.key(account)
        self.vtc.join(key)
        self._waiters.setdefault(key, collections.deque()).append((fut, input_tokens, output_tokens))
        self.count += 1

    def give_up(self, account: str, fut: asyncio.Future) -> None:
        """A waiter that was not handed a slot leaves."""
        fut.cancel()
        self._left(self.key(account))

    def _left(self, key: str) -> None:
        self.count -= 1
        self.vtc.leave(key)
        if not self.vtc.waiting(key):
            self._waiters.pop(key, None)

    def peek(self) -> tuple[str, asyncio.Future] | None:
        """The next waiter's key and future, without taking it; None when nobody waits."""
        key = self.vtc.next_account()
        return None if key is None else (key, self._first(key))

    def pop(self, key: str | None = None) -> tuple[str, asyncio.Future] | None:
        """The next waiter's key and future (``key``: that account's first waiter), charged its
        estimate; None when nobody waits."""
        head = self.peek() if key is None else (key, self._first(key))
        if head is None:
            return None
        key = head[0]
        _, input_tokens, output_tokens = self._waiters[key].popleft()
        self._left(key)
        self.vtc.charge(key, input_tokens, output_tokens)
        return head

    def _first(self, key: str) -> asyncio.Future:
        q = self._waiters[key]
        while q[0][0].done():
            q.popleft()  # gave up; already counted out
        return q[0][0]

    def least_served(self, eligible: Callable[[str, asyncio.Future], bool]) -> str | None:
        """The waiting account with the smallest counter among those whose first waiter is
        ``eligible``; None if there is none. O(waiting accounts): for the headroom only."""
        best: tuple[float, str] | None = None
        for key in self._waiters:
            if eligible(key, self._first(key)) and (best is None or self.vtc.counter(key) < best[0]):
                best = (self.vtc.counter(key), key)
        return None if best is None else best[1]


class PoolGate:
    """This ingress's gate in front of one pool (see policies/tiers.py).

    Each ingress replica owns an equal share of the pool's running slots. Standard requests run in
    all but the Priority reserve and wait here, in fair-share order, for a slot of their share;
    Priority waits only when every slot is taken, and goes ahead of any waiting Standard request.
    Nobody waits longer than the shedding rule allows.
    """

    def __init__(self, model: ModelConfig, config: EmberConfig,
                 registry: CapacityRegistry | None = _DEFAULT,  # type: ignore[assignment]
                 app: str | None = _DEFAULT):  # type: ignore[assignment]
        """``registry``: where the pool's live replica count comes from (the process's
        ``deployments.capacity.REGISTRY`` by default; None: the config's count, fixed).
        ``app``: the Serve application of the pool (default: this replica's; None: any)."""
        auto = model.autoscaling
        ing = config.ingress
        self.model_id = model.id
        self.deployment = model.deployment_name
        self.ingress = ing
        self.ingresses = ing.num_replicas or (ing.autoscaling.min_replicas if ing.autoscaling else 1) or 1
        self.seqs_per_replica = model.engine.max_num_seqs
        self.max_replicas = auto.max_replicas if auto else (model.num_replicas or 1)
        self.replica_start_s = auto.replica_start_s if auto else DEFAULT_REPLICA_START_S
        self.cold_start_hold_s = auto.cold_start_hold_s if auto else 0.0
        self.replicas = model.num_replicas or (auto.starting_replicas if auto else 1)
        self.reported = False  # whether the pool's router has said how many replicas run
        self.slots = self._slots_for(self.replicas)
        # The engines' fair-share headroom (sequences past max_num_seqs), fair-share order only.
        self.headroom_per_replica = model.engine.fair_share_seqs if ing.queue_order == "vtc" else 0
        self.headroom = self._headroom_for(self.replicas)
        # Interactive slots held per account (queue key), for who is under a fair share.
        self._held: collections.Counter[str] = collections.Counter()
        # Slots held back for Priority; a model that offers no Priority tier keeps none idle.
        self.reserve = ing.priority_reserve if model.pricing.priority is not None else 0.0
        self.offers_priority = model.pricing.priority is not None
        # Priority's slots in flight and its peak over the last window, in two half-window buckets.
        self.priority_in_flight = 0
        self._peak_now = self._peak_before = 0
        self._peak_since = time.monotonic()
        self.batch_headroom = config.batch.headroom  # slots Batch leaves free for interactive arrivals
        self.in_flight = 0
        self.preempted = 0  # batch lines stopped to free a slot for an interactive request
        # Interactive (priority and standard) slots held, and when one was last taken or given
        # back: what the batch runner yields to (``interactive_signal``).
        self.interactive_in_flight = 0
        self._interactive_at: float | None = None
        self.service_time_s = 0.5  # prior until the first request finishes
        weights = TokenWeights(ing.fair_share_weights.input, ing.fair_share_weights.output)
        by_account = ing.queue_order == "vtc"
        self._queues: dict[str, TierQueue] = {
            "priority": TierQueue(weights, by_account), "standard": TierQueue(weights, by_account)}
        self._batch: weakref.WeakSet[asyncio.Future] = weakref.WeakSet()  # Batch waits among Standard
        # Batch lines holding a slot that may be taken back (``hold_batch``): holder -> preempt().
        self._preemptible: dict[object, Callable[[], bool]] = {}
        self._cold_since: float | None = time.monotonic() if self.replicas == 0 else None
        self._grew_at = time.monotonic()  # the last time the pool gained a replica (or the gate began)
        self._full_since: float | None = None  # since when every slot has been taken (None: one is free)
        self._subscriber: Subscriber | None = None
        self._unsubscribe = None
        if registry is _DEFAULT:
            registry = REGISTRY
        if registry is not None and (auto is None or auto.gate_follows_replicas):
            self._subscriber = Subscriber(self.set_replicas)
            self._unsubscribe = registry.subscribe(
                self.deployment, self._subscriber, current_app_name() if app is _DEFAULT else app)

    def _slots_for(self, replicas: int) -> int:
        return max(1, replicas * self.seqs_per_replica // self.ingresses)

    def _headroom_for(self, replicas: int) -> int:
        return replicas * self.headroom_per_replica // self.ingresses

    def set_replicas(self, replicas: int) -> None:
        """The pool now runs ``replicas``: resize, and hand any new slots to waiters at once.
        Call it on the gate's event loop (``deployments.capacity.Subscriber`` does)."""
        replicas = max(0, int(replicas))
        self.reported = True
        if replicas == 0 and self.replicas > 0:
            self._cold_since = time.monotonic()
        elif replicas > 0:
            self._cold_since = None
        if replicas > self.replicas:
            self._grew_at = time.monotonic()
        old = self.slots
        self.replicas = replicas
        self.slots = self._slots_for(replicas)
        self.headroom = self._headroom_for(replicas)
        if self.slots > old:
            self._hand_over()

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def observe(self, seconds: float) -> None:
        self.service_time_s += 0.1 * (seconds - self.service_time_s)

    def waiting(self, tier: str | None = None) -> int:
        queues = self._queues.values() if tier is None else [self._queue(tier)]
        return sum(q.count for q in queues)

    def queued_by_tier(self) -> dict[str, int]:
        """Requests waiting here, by tier (the ingress's autoscaling metric)."""
        batch = sum(1 for f in self._batch if not f.done())
        return {"priority": self.waiting("priority"), "standard": self.waiting("standard") - batch,
                "batch": batch}

    def interactive_signal(self) -> dict:
        """Interactive traffic here now, for the batch runner (``policies.batch.Signal``)."""
        q = self.queued_by_tier()
        idle = 0.0 if self.interactive_in_flight else (
            1e9 if self._interactive_at is None else time.monotonic() - self._interactive_at)
        return {"interactive": self.interactive_in_flight, "waiting": q["priority"] + q["standard"], "idle_s": idle,
                "capacity": self._usable("batch") * self.ingresses}

    def state(self) -> dict:
        return {"slots": self.slots, "headroom": self.headroom, "in_flight": self.in_flight,
                "waiting": self.waiting(), "waiting_priority": self.waiting("priority"), "replicas": self.replicas,
                "max_replicas": self.max_replicas, "reported": self.reported, "batch_preempted": self.preempted}

    def _queue(self, tier: str) -> TierQueue:
        return self._queues["priority" if tier == "priority" else "standard"]

    def _usable(self, tier: str) -> int:
        if tier == "priority":
            if not self.headroom:
                return self.slots
            # Standard requests in the headroom run beyond Standard's share, not in Priority's
            # reserve: Priority's ceiling rises by as many.
            std_over = self.in_flight - self.priority_in_flight - self._usable("standard")
            return self.slots + min(self.headroom, max(0, std_over))
        if not self.offers_priority:
            standard = usable_slots("standard", self.slots, self.reserve)
        else:
            standard = max(1, self.slots - priority_reserve_slots(self.slots, self.reserve, self.priority_peak()))
        if tier == "batch":  # Batch also leaves batch_headroom of the slots to interactive arrivals
            return max(1, standard - math.ceil(self.slots * self.batch_headroom - 1e-9))
        return standard

    def _standard_reserve(self) -> float:
        """The share of slots Standard leaves to Priority now (for the shedding estimate)."""
        return 1 - self._usable("standard") / self.slots

    def priority_peak(self) -> int:
        """The most Priority requests in flight at once over the last ``PRIORITY_WINDOW_S`` (or so)."""
        now = time.monotonic()
        if now - self._peak_since >= PRIORITY_WINDOW_S / 2:
            recent = now - self._peak_since < PRIORITY_WINDOW_S
            self._peak_before = self._peak_now if recent else 0
            self._peak_now = self.priority_in_flight
            self._peak_since = now
        return max(self._peak_now, self._peak_before)

    def _took(self, tier: str, key: str) -> None:
        self.in_flight += 1
        if tier != "batch":
            self._held[key] += 1
            self.interactive_in_flight += 1
            self._interactive_at = time.monotonic()
        if tier == "priority":
            self.priority_in_flight += 1
            self.priority_peak()
            self._peak_now = max(self._peak_now, self.priority_in_flight)

    def _scale_up_wait_s(self, now: float) -> float | None:
        """How much longer requests may wait for replicas on their way: what is left of
        ``replica_start_s`` since the pool filled up or last grew, whichever is later. None at the
        maximum size, or once that time has passed with no new replica."""
        if self.replicas >= self.max_replicas:
            return None
        full_since = self._full_since if self._full_since is not None else now
        left = self.replica_start_s - (now - max(self._grew_at, full_since))
        return left if left > 0 else None

    def _cold_retry_after(self) -> int:
        since = self._cold_since if self._cold_since is not None else time.monotonic()
        return max(1, math.ceil(self.replica_start_s - (time.monotonic() - since)))

    async def acquire(self, tier: str, model_id: str, account: str = "", input_tokens: int = 0,
                      output_tokens: int = 0) -> float:
        """Take a slot (waiting within the shedding bound) or raise 503 ``overloaded``.

        ``input_tokens``/``output_tokens``: the request's estimate, charged to ``account``'s
        fair-share counter when it gets the slot. Returns the charge, for ``correct``."""
        if self._subscriber is not None:
            self._subscriber.bind_loop()
        ing = self.ingress
        queue = self._queue(tier)
        cold = self.replicas == 0
        via_headroom = False  # admitted past the shedding bound because it may run in the headroom
        if cold:
            # Scaled to zero: one request goes through and wakes the pool; the others wait for
            # its first replica, up to cold_start_hold_s.
            bound_s = self.cold_start_hold_s
        else:
            waiting_priority = self._queues["priority"].count
            # Batch lines an interactive request would preempt are not ahead of it.
            held = self.in_flight - (len(self._preemptible) if tier != "batch" else 0)
            ahead = held + (queue.ahead(account) if tier == "priority" else
                            waiting_priority + queue.ahead(account))
            now = time.monotonic()
            if self._full_since is None and not self._free_for(tier):
                self._full_since = now
            growing = self._scale_up_wait_s(now)
            d = shed(tier, ahead, self.slots, self.service_time_s, ing.max_queue_wait_s,  # type: ignore[arg-type]
                     ing.priority_headroom, self._standard_reserve(), growing, self.batch_headroom)
            via_headroom = not d.admit and self._headroom_for_new(tier, queue.key(account), queue)
            if not d.admit and not via_headroom:
                raise overloaded(model_id, d.expected_wait_s)
            bound_s = 2 * d.bound_s  # the estimate said it fits the bound; twice it is the hard stop
        # An interactive request that finds no free slot stops a batch line to get one (its slot
        # comes back as that line's task ends, to this request waiting below; at once if the
        # line gave it back while being stopped).
        # An account under its fair share that finds none runs in the engines' headroom.
        key = queue.key(account)
        preempted = False
        if (via_headroom or self._free_for(tier)
                or (tier != "batch" and (preempted := self._preempt_one()) and self._free_for(tier))
                or (not preempted and self._headroom_for_new(tier, key, queue))):
            self._took(tier, key)
            return queue.vtc.charge(key, input_tokens, output_tokens)
        if cold and bound_s <= 0:
            raise self._cold_error(model_id)
        fut = asyncio.get_running_loop().create_future()
        queue.push(account, fut, input_tokens, output_tokens)
        if tier == "batch":
            self._batch.add(fut)
        try:
            async with asyncio.timeout(max(0.05, bound_s)):
                await asyncio.shield(fut)
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                # Handed a slot just as it gave up: pass it on, and take back the charge.
                queue.vtc.correct(key, queue.vtc.weights.cost(input_tokens, output_tokens), 0, 0)
                self.release(tier, account=account)
            else:
                queue.give_up(account, fut)
                if self.headroom:
                    self._hand_over()  # a Priority waiter leaving may let Standard into the headroom
            if isinstance(exc, TimeoutError):
                if self.replicas == 0:
                    raise self._cold_error(model_id) from None
                raise overloaded(model_id) from None
            raise
        return queue.vtc.weights.cost(input_tokens, output_tokens)

    def correct(self, tier: str, account: str, charged: float, input_tokens: int, output_tokens: int) -> None:
        """A request charged ``charged`` at ``acquire`` ended having used these tokens."""
        queue = self._queue(tier)
        queue.vtc.correct(queue.key(account), charged, input_tokens, output_tokens)

    def _cold_error(self, model_id: str):
        err = overloaded(model_id)
        retry = self._cold_retry_after()
        err.message = f"{model_id} is starting (scaled to zero); retry in about {retry} s"
        err.headers = {**err.headers, "Retry-After": str(retry)}
        return err

    def _free_for(self, tier: str) -> bool:
        return self.in_flight < self._usable(tier) and not self._queues["priority"].count and (
            tier == "priority" or not self._queues["standard"].count)

    def hold_batch(self, holder: object, preempt: Callable[[], bool]) -> None:
        """A batch line holding a slot that an interactive request may take back: ``preempt()``
        stops the line (its slot comes back through ``release``) and says whether it did."""
        self._preemptible[holder] = preempt

    def _preempt_one(self) -> bool:
        """An interactive request found no free slot: stop the batch line that started last
        (the least work lost). The slot it gives back goes to the waiting request."""
        while self._preemptible:
            holder = next(reversed(self._preemptible))
            preempt = self._preemptible.pop(holder)
            if preempt():
                self.preempted += 1
                return True
        return False

    def release(self, tier: str = "standard", holder: object = None, account: str = "") -> None:
        """A request of ``tier`` and ``account`` gives its slot back (``holder``: as given to
        ``hold_batch``)."""
        if holder is not None:
            self._preemptible.pop(holder, None)
        self.in_flight -= 1
        if tier != "batch":
            key = self._queue(tier).key(account)
            self._held[key] -= 1
            if self._held[key] <= 0:
                del self._held[key]
            self.interactive_in_flight = max(0, self.interactive_in_flight - 1)
            self._interactive_at = time.monotonic()
        if tier == "priority":
            self.priority_in_flight = max(0, self.priority_in_flight - 1)
        self._hand_over()
        if self.in_flight < self.slots and not self.waiting():
            self._full_since = None  # a slot stands free and nobody waits: the pool is not full now

    def _largest_other(self) -> Callable[[str], int]:
        """For any account, the most slots another account holds (O(accounts holding slots),
        once per decision: asked only when every slot is taken)."""
        top = heapq.nlargest(2, self._held.items(), key=lambda kv: kv[1])
        first_key, first = top[0] if top else ("", 0)
        second = top[1][1] if len(top) > 1 else 0
        return lambda key: second if key == first_key else first

    def _in_headroom(self, tier: str, key: str, new: bool = False,
                     largest_other: Callable[[str], int] | None = None) -> bool:
        """Whether an interactive request of ``key`` may run in the headroom now: the headroom is
        not full, (for Standard) no Priority request waits, and the account's demand (slots held,
        requests waiting, and the ``new`` one) is within its max-min fair share."""
        if not (self.headroom > 0 and tier != "batch" and self.in_flight < self._headroom_ceiling(tier)
                and (tier == "priority" or not self._queues["priority"].count)):
            return False
        demand = self._held.get(key, 0) + new + sum(q.vtc.waiting(key) for q in self._queues.values())
        return under_fair_share(demand, (largest_other or self._largest_other())(key))

    def _headroom_ceiling(self, tier: str) -> int:
        """How many may be in flight with ``tier``'s requests in the headroom: its slots plus the
        headroom (Priority: all the slots plus the headroom, never more)."""
        return min(self._usable(tier), self.slots) + self.headroom

    def _headroom_waiter(self, tier: str, queue: TierQueue) -> str | None:
        """The least-served waiting account of ``tier`` that may run in the headroom now."""
        if not (self.headroom > 0 and self.in_flight < self._headroom_ceiling(tier)):
            return None
        others = self._largest_other()
        return queue.least_served(
            lambda key, fut: fut not in self._batch and self._in_headroom(tier, key, False, others))

    def _headroom_for_new(self, tier: str, key: str, queue: TierQueue) -> bool:
        """A new request may run in the headroom if it would, and nobody who may waits (they go
        first), nor any earlier request of its own account."""
        if not self.headroom or queue.vtc.waiting(key) or not self._in_headroom(tier, key, new=True):
            return False
        return self._headroom_waiter(tier, queue) is None

    def _hand_over(self) -> None:
        for tier in ("priority", "standard"):
            queue = self._queues[tier]
            while queue.count and self.in_flight < self._usable(tier):
                head = queue.pop()
                if head is None:
                    break
                key, fut = head
                self._took("batch" if fut in self._batch else tier, key)
                fut.set_result(None)
        if not self.headroom:
            return
        for tier in ("priority", "standard"):
            queue = self._queues[tier]
            while queue.count:
                key = self._headroom_waiter(tier, queue)
                if key is None:
                    break
                _, fut = queue.pop(key)  # type: ignore[misc]
                self._took(tier, key)
                fut.set_result(None)

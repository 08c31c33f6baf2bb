"""Fair share among accounts within a tier: the Virtual Token Counter (VTC). Pure; no clock needed.

VTC ("Fairness in Serving Large Language Models", Sheng et al., OSDI 2024) keeps, per account,
a counter of the *weighted tokens* it has been served, ``w_in × input + w_out × output`` (1 and 2
by default: a generated token costs the engine about twice a prompt token). When a slot frees,
the waiting request of the account with the smallest counter goes next; within an account,
requests keep their arrival order. An account alone is never held back: the queue is ordered,
not rationed (work-conserving).

*Counter lift.* An account that starts waiting (it had nothing queued) has its counter raised
to the smallest counter among the accounts already waiting, or, if none is waiting, to the
counter of the last account that stopped waiting. So an account that was idle (or new) cannot
bank credit while others were served and then crowd them out on its return; it enters level
with the least-served waiting account and shares from there. Ties go to the account served
least recently, so the account that just joined level with a busy one goes first: a quiet
account waits for one free slot, not for a round of everyone else.

*Charging.* The ingress does not see tokens as they are generated, so a request is charged its
estimate when it gets a slot (prompt tokens, ``max_tokens × n`` output tokens) and corrected by
the difference when it ends with its real usage (``correct``). Over-charging for a moment only
makes the account's next request wait a little longer; the correction gives it back.

Bound: for two accounts that are both waiting throughout an interval, the difference of their
weighted service over it stays within ``2 × max(w_in × max input, w_out × max output)`` per
request (``vtc_bound``); with the default weights, ``2 × max(max input, 2 × max output)``.

Worked example (weights 1/2). Account A has counter 900 and two requests waiting; B arrives with
counter 0 and one waiting request. B is lifted to 900 (the least among waiting accounts), not
left at 0, so it does not get the next nine slots. A slot frees: A and B tie at 900 and B, served
less recently, goes first, charged 100 prompt + 2 × 50 output = 200 → B 1100. The next slot goes
to A (900 < 1100), charged 200 → A 1100, and so on, alternately. If A's request ends after
20 output tokens instead of 50, ``correct`` takes 2 × 30 = 60 back: A 1040.

The ordering is a heap of waiting accounts keyed by (counter, when last served), so
choosing the next account and changing a counter each cost O(log accounts); entries made stale
by a counter change are skipped when they reach the top.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TokenWeights:
    """How many counter units one prompt (input) and one generated (output) token cost."""

    input: float = 1.0
    output: float = 2.0

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return self.input * input_tokens + self.output * output_tokens


def under_fair_share(demand: int, largest_other: int) -> bool:
    """Whether an account whose ``demand`` (slots it holds plus requests it has waiting, the one
    asking included) is within its max-min fair share of a full pool, where the account holding
    the most slots among the others holds ``largest_other``.

    Under max-min fairness every account gets its whole demand up to a common level, and the
    accounts that want more split the rest. So if another account holds more than this one wants,
    this one is owed its whole demand: giving it a slot moves the pool towards the fair split.
    Strictly more: accounts that each want what another holds (light accounts arriving one after
    another, each holding 1) are level already, and must not keep a backlogged account that holds
    as little from its turn. It decides who may run in the engine's fair-share headroom
    (``EngineConfig.fair_share_headroom``) when every slot is taken: VTC orders the queue, but a
    quiet account at the head of it still waits for a slot to end, and a noisy account's requests
    of equal length end in waves up to one request's duration apart. Demand, not slots held: an
    account with a backlog is served in VTC order in the slots, never in the headroom. An account
    alone has nobody to compare with (``largest_other`` 0), so it never runs there: the headroom
    serves fairness, not capacity."""
    return 0 < demand < largest_other


def vtc_bound(max_input_tokens: int, max_output_tokens: int, weights: TokenWeights = TokenWeights()) -> float:
    """The most two continuously waiting accounts' weighted service may differ under VTC."""
    return 2 * max(weights.input * max_input_tokens, weights.output * max_output_tokens)


class VirtualTokenCounter:
    """Counters and the order of waiting accounts, for one queue (one tier of one gate).

    Contract: every ``join(a)`` is matched by exactly one ``leave(a)`` (the request was served or
    gave up); ``next_account`` names a waiting account, or None when nobody waits.
    """

    def __init__(self, weights: TokenWeights = TokenWeights()):
        self.weights = weights
        self.counters: dict[str, float] = {}
        self._waiting: dict[str, int] = {}  # account -> requests waiting
        self._version: dict[str, int] = {}  # account -> version of its live heap entry
        self._heap: list[tuple[float, int, str, int]] = []  # (counter, last served, account, version)
        self._served: dict[str, int] = {}  # account -> when it was last charged (a sequence number)
        self._seq = itertools.count(1)
        self._last_left = 0.0  # counter of the last account that stopped waiting
        self._prune_at = 1024

    # -- reading ---------------------------------------------------------------------------------

    def counter(self, account: str) -> float:
        return self.counters.get(account, 0.0)

    def waiting(self, account: str) -> int:
        return self._waiting.get(account, 0)

    def waiting_accounts(self) -> int:
        return len(self._waiting)

    def next_account(self) -> str | None:
        """The waiting account with the smallest counter (ties: the one served least recently)."""
        heap = self._heap
        while heap:
            _, _, account, version = heap[0]
            if self._version.get(account) == version and account in self._waiting:
                return account
            heapq.heappop(heap)  # stale: the counter changed or the account stopped waiting
        return None

    # -- waiting ---------------------------------------------------------------------------------

    def join(self, account: str) -> None:
        """A request of ``account`` starts waiting."""
        n = self._waiting.get(account, 0)
        if n == 0:
            floor_account = self.next_account()
            floor = self.counter(floor_account) if floor_account is not None else self._last_left
            self.counters[account] = max(self.counter(account), floor)
            self._waiting[account] = 1
            self._push(account)
        else:
            self._waiting[account] = n + 1

    def leave(self, account: str) -> None:
        """A waiting request of ``account`` stops waiting (it got a slot or gave up)."""
        n = self._waiting.get(account, 0)
        if n > 1:
            self._waiting[account] = n - 1
            return
        if n == 1:
            del self._waiting[account]
            self._version.pop(account, None)
            self._last_left = self.counter(account)
            if not self._waiting:
                self._prune()

    # -- charging --------------------------------------------------------------------------------

    def charge(self, account: str, input_tokens: int, output_tokens: int) -> float:
        """Add a request's (estimated) weighted tokens to the account; returns what was added."""
        cost = self.weights.cost(input_tokens, output_tokens)
        self._served[account] = next(self._seq)
        self._add(account, cost)
        return cost

    def correct(self, account: str, charged: float, input_tokens: int, output_tokens: int) -> None:
        """A request charged ``charged`` ended having used these tokens: settle the difference."""
        delta = self.weights.cost(input_tokens, output_tokens) - charged
        if delta:
            self._add(account, delta)

    def _add(self, account: str, amount: float) -> None:
        self.counters[account] = self.counter(account) + amount
        if account in self._waiting:
            self._push(account)  # re-key; the old entry goes stale

    def _push(self, account: str) -> None:
        version = self._version.get(account, 0) + 1
        self._version[account] = version
        heapq.heappush(self._heap, (self.counters[account], self._served.get(account, 0), account, version))

    def _prune(self) -> None:
        """With nobody waiting, any returning account is lifted to at least ``_last_left``: counters
        at or below it say nothing more and are dropped (amortized: only once the table doubled)."""
        self._heap.clear()
        if len(self.counters) < self._prune_at:
            return
        floor = self._last_left
        self.counters = {a: c for a, c in self.counters.items() if c > floor}
        self._served = {a: t for a, t in self._served.items() if a in self.counters}
        self._prune_at = max(1024, 2 * len(self.counters))

"""LLM-aware autoscaling: how many replicas each model pool should run. Pure; the clock is passed in.

A pool's *demand* is what is waiting or being served, counted in sequences: the sequences its
replicas are running, those admitted but not yet running (the engine's waiting queue and Serve's
handle queue), and the requests held at the ingress gates, per tier (``Knobs.tier_weights``;
Batch weighs 0 by default, since Batch fills idle capacity rather than buying replicas). Its
*load* is that demand in replicas, each filled to ``target_utilization`` of its capacity
(``max_num_seqs``)::

    load    = (running + waiting + Σ_tier weight[tier] × queued[tier]) / (capacity × target_utilization)
    desired = ceil(load)

Rules of ``decide``, in order:

1. *Bounds.* A target outside ``[min_replicas, max_replicas]`` is brought inside at once.
2. *Up on sustained load, in one jump.* When the *lowest* load of the last ``upscale_window_s``
   (2 s) needs more replicas than the target, ``ceil(low) > current``, the target becomes
   ``min(ceil(low), max_replicas)`` on that call (no further delay, no step limit). A step in
   demand holds for the window; a burst of random arrivals, which pushes the sequences in flight
   far above their mean for a moment when a pool runs near its target utilization, does not, and
   would otherwise buy a replica that the next scale-down takes back (a reversal). A cold pool
   (target 0) with any demand, Batch included, wakes to at least one replica at once.
3. *Down slowly.* Only if the *peak* load of the last ``downscale_delay_s`` would fit one replica
   fewer with the hysteresis margin, ``ceil(peak / (1 - hysteresis)) < current``, the pool has been
   watched for at least ``downscale_delay_s``, and the last change is ``downscale_step_interval_s``
   old: then one replica fewer, never below ``max(min_replicas, 1)``. Serve drains the replica it
   stops (its streams finish; see ``deployments/autoscaling.py``).
4. *To zero.* Only when ``min_replicas == 0``, the target is 1, and demand (every tier) has been
   exactly zero for ``idle_to_zero_s``.

Between the up threshold (``load > current``) and the down threshold
(``peak ≤ (current − 1)(1 − hysteresis)``) the target holds, so load that wanders by less than
the hysteresis never moves it: with h = 0.15, steady noise with ``min/max ≥ 0.85`` settles after
at most one reversal (an initial overshoot corrected) and then never changes.

Worked example (capacity 16 sequences, ``target_utilization`` 0.8 → 12.8 sequences a replica,
hysteresis 0.15, delay 30 s, step 10 s):

* t=0, target 1: 10 running, 0 queued → load 0.78, desired 1: hold.
* t=5: a 4× step, 16 running (the replica is full) + 24 queued at the gates → load 3.13.
* t=7: the load has been ≥ 3.13 for the 2 s window → target 4 ("scale_up").
* t=5…65: load stays about 3.1: below 4, above (4 − 1) × 0.85 = 2.55 → hold.
* t=65: load falls to 1.5 (19 sequences). The 30 s peak is still 3.1 → hold until t=95, when
  the window holds only 1.5: ceil(1.5 / 0.85) = 2 < 4 → 3 ("scale_down"); t=105 → 2; then hold,
  since ceil(1.76) = 2.

``allocate`` shares a total replica budget between models: each gets its ``min_replicas`` first,
then the rest goes by demand in tiers of urgency (what is in flight plus the Priority queue,
then the Standard queue, then Batch, then the hysteresis surplus), one replica at a time to the
model with the most unmet load. ``decide_all`` runs ``decide`` per model and then the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

TIERS = ("priority", "standard", "batch")
_EPS = 1e-9


def _default_tier_weights() -> dict[str, float]:
    return {"priority": 1.0, "standard": 1.0, "batch": 0.0}


@dataclass(frozen=True, slots=True)
class Knobs:
    """The policy's tuning; the defaults are what Ember ships.

    target_utilization: share of a replica's sequence capacity to plan for (0 < u ≤ 1).
    upscale_window_s: the load's minimum over this window decides a scale-up (0: the load now).
    hysteresis: relative margin below one replica fewer before scaling down (0 ≤ h < 1).
    downscale_delay_s: the load's peak over this window decides a scale-down; nor does a pool
        scale down before it has been watched this long.
    downscale_step_interval_s: least time between a change and the next one-replica step down.
    idle_to_zero_s: zero demand this long takes a ``min_replicas == 0`` pool from 1 to 0.
    tier_weights: how much a request queued at the ingress in each tier counts as demand.
    """

    target_utilization: float = 0.8
    upscale_window_s: float = 2.0
    hysteresis: float = 0.15
    downscale_delay_s: float = 30.0
    downscale_step_interval_s: float = 10.0
    idle_to_zero_s: float = 300.0
    tier_weights: Mapping[str, float] = field(default_factory=_default_tier_weights)

    def __post_init__(self) -> None:
        if not 0 < self.target_utilization <= 1:
            raise ValueError("target_utilization must be in (0, 1]")
        if not 0 <= self.hysteresis < 1:
            raise ValueError("hysteresis must be in [0, 1)")
        for name in ("upscale_window_s", "downscale_delay_s", "downscale_step_interval_s", "idle_to_zero_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        unknown = set(self.tier_weights) - set(TIERS)
        if unknown:
            raise ValueError(f"unknown tiers in tier_weights: {sorted(unknown)}")
        if any(w < 0 for w in self.tier_weights.values()):
            raise ValueError("tier weights must be >= 0")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Knobs":
        d = dict(d or {})
        weights = {**_default_tier_weights(), **d.pop("tier_weights", {})}
        return cls(tier_weights=weights, **d)

    def weight(self, tier: str) -> float:
        return float(self.tier_weights.get(tier, self.tier_weights.get("standard", 1.0)))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One pool as the autoscaler sees it at ``now``.

    capacity_seqs: sequences one replica runs at once (the engine's ``max_num_seqs``), > 0.
    running_seqs: sequences running on all the pool's replicas.
    waiting_seqs: admitted but not yet running: the engines' waiting queues plus requests queued
        in Serve's handles.
    queued: requests held at the ingress gates, by tier ("priority", "standard", "batch").
    """

    now: float
    current_target: int
    capacity_seqs: float
    running_replicas: int = 0
    running_seqs: float = 0.0
    waiting_seqs: float = 0.0
    queued: Mapping[str, float] = field(default_factory=dict)
    min_replicas: int = 1
    max_replicas: int = 1

    def __post_init__(self) -> None:
        if not self.capacity_seqs > 0:
            raise ValueError("capacity_seqs must be > 0")
        if self.min_replicas < 0 or self.max_replicas < 0 or self.current_target < 0:
            raise ValueError("replica counts must be >= 0")

    def total_demand(self) -> float:
        """Every sequence waiting or served, all tiers counted in full (for idleness)."""
        return (max(0.0, self.running_seqs) + max(0.0, self.waiting_seqs)
                + sum(max(0.0, v) for v in self.queued.values()))


@dataclass(frozen=True, slots=True)
class State:
    """What ``decide`` carries from one call to the next (returned, never mutated).

    peaks: (time, load) of the last ``downscale_delay_s``, loads strictly decreasing: the first is
        the window's peak (a sliding-window maximum, so it stays short).
    lows: (time, load) of the last ``upscale_window_s``, loads strictly increasing: the first is
        the window's minimum.
    """

    observed_since: float | None = None
    last_change_s: float | None = None
    peaks: tuple[tuple[float, float], ...] = ()
    idle_since: float | None = None
    lows: tuple[tuple[float, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"observed_since": self.observed_since, "last_change_s": self.last_change_s,
                "peaks": [list(p) for p in self.peaks], "idle_since": self.idle_since,
                "lows": [list(p) for p in self.lows]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "State":
        if not d:
            return cls()
        return cls(observed_since=d.get("observed_since"), last_change_s=d.get("last_change_s"),
                   peaks=tuple((float(t), float(v)) for t, v in d.get("peaks", ())),
                   idle_since=d.get("idle_since"),
                   lows=tuple((float(t), float(v)) for t, v in d.get("lows", ())))


@dataclass(frozen=True, slots=True)
class Decision:
    target: int
    reason: str
    load: float      # demand in replicas at target utilization
    desired: int     # ceil(load), before bounds, hysteresis and budget
    state: State


def _replicas(load: float) -> int:
    return 0 if load <= _EPS else math.ceil(load - _EPS)


def load_of(snap: Snapshot, knobs: Knobs, tiers: Iterable[str] = TIERS) -> float:
    """Demand in replicas at target utilization: what is in flight plus the given queued tiers."""
    seqs = max(0.0, snap.running_seqs) + max(0.0, snap.waiting_seqs)
    seqs += sum(knobs.weight(t) * max(0.0, snap.queued.get(t, 0.0)) for t in tiers)
    return seqs / (snap.capacity_seqs * knobs.target_utilization)


def decide(snap: Snapshot, state: State, knobs: Knobs = Knobs()) -> Decision:
    """The pool's next target, the reason, and the state for the next call. See the module doc."""
    now = snap.now
    lo = snap.min_replicas
    hi = max(snap.max_replicas, lo)
    cur = snap.current_target
    load = load_of(snap, knobs)
    desired = _replicas(load)
    idle = snap.total_demand() <= 0.0

    # Sliding-window peak of the load over the last downscale_delay_s.
    horizon = now - knobs.downscale_delay_s
    peaks = [p for p in state.peaks if p[0] >= horizon and p[0] <= now]
    while peaks and peaks[-1][1] <= load:
        peaks.pop()
    peaks.append((now, load))
    peak = peaks[0][1]
    # Sliding-window minimum over the last upscale_window_s (the load now included).
    lows = [p for p in state.lows if now - knobs.upscale_window_s <= p[0] <= now]
    while lows and lows[-1][1] >= load:
        lows.pop()
    lows.append((now, load))
    sustained = _replicas(lows[0][1])

    observed_since = state.observed_since if state.observed_since is not None else now
    idle_since = (state.idle_since if state.idle_since is not None else now) if idle else None
    step_ok = state.last_change_s is None or now - state.last_change_s >= knobs.downscale_step_interval_s

    want_up = max(sustained, 1) if (cur == 0 and not idle) else sustained
    if cur > hi:
        target, reason = hi, "clamp_max"
    elif cur < lo:
        target, reason = max(lo, min(want_up, hi)), "clamp_min"
    elif want_up > cur:
        target = min(want_up, hi)
        reason = "scale_up" if target > cur else "at_max"
    elif cur == 0:
        target, reason = 0, "idle"
    else:
        floor = max(lo, 1)
        keep = max(_replicas(peak / (1.0 - knobs.hysteresis)), floor)
        watched = now - observed_since >= knobs.downscale_delay_s
        if keep < cur and watched and step_ok:
            target, reason = cur - 1, "scale_down"
        elif keep < cur:
            target, reason = cur, "cooldown"
        elif (cur == 1 and lo == 0 and idle_since is not None
              and now - idle_since >= knobs.idle_to_zero_s and step_ok):
            target, reason = 0, "idle_to_zero"
        else:
            target, reason = cur, "hold"

    new_state = State(observed_since=observed_since,
                      last_change_s=now if target != cur else state.last_change_s,
                      peaks=tuple(peaks), idle_since=idle_since, lows=tuple(lows))
    return Decision(target, reason, load, desired, new_state)


# -- a budget shared by several models ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BudgetRequest:
    """One model's claim on the shared budget.

    loads: cumulative replica needs by urgency: (in flight + Priority queue, + Standard queue,
        + Batch queue). ``desired`` (the model's own decision) is the last, least urgent step.
    """

    min_replicas: int
    max_replicas: int
    desired: int
    loads: tuple[float, ...] = ()
    current: int = 0

    @classmethod
    def of(cls, snap: Snapshot, decision: Decision, knobs: Knobs = Knobs()) -> "BudgetRequest":
        loads = tuple(load_of(snap, knobs, TIERS[: i + 1]) for i in range(len(TIERS)))
        return cls(snap.min_replicas, max(snap.max_replicas, snap.min_replicas), decision.target,
                   loads, snap.current_target)


def allocate(requests: Mapping[str, BudgetRequest], total_cap: int | None,
             stickiness: float = 0.5) -> dict[str, int]:
    """Share ``total_cap`` replicas: mins first, then by demand, urgent tiers first.

    Every model gets ``min_replicas`` (even if the mins alone exceed the cap: a minimum is a
    promise), never more than its own ``desired`` (clamped to its bounds), and the total stays
    within the cap whenever the mins fit. Within each urgency step the next replica goes to the
    model with the most unmet load, a replica it already runs counting ``stickiness`` replicas of
    load extra (moving a replica costs a drain and a cold start, so near-ties do not move it;
    then ties: the larger current target, then the name). A surge on one model takes everything
    the others' minimums leave.

    Worked example, cap 6: A (min 1, desired 5, 20 running + 40 Standard queued at 12.8 a replica
    → loads (1.6, 4.7, 4.7)) and B (min 1, desired 3, 8 running + 16 Priority queued → loads
    (1.9, 1.9, 1.9)). Mins: A 1, B 1. In flight + Priority: A → 2, B → 2. Standard: A → 4 (the
    cap). B's hysteresis surplus (3) waits: A 4, B 2.
    """
    floors = {k: r.min_replicas for k, r in requests.items()}
    wants = {k: min(max(r.desired, r.min_replicas), max(r.max_replicas, r.min_replicas))
             for k, r in requests.items()}
    if total_cap is None or sum(wants.values()) <= total_cap:
        return wants
    alloc = dict(floors)
    left = total_cap - sum(alloc.values())
    n_steps = max((len(r.loads) for r in requests.values()), default=0) + 1
    for step in range(n_steps):
        if left <= 0:
            break
        goal: dict[str, float] = {}
        for k, r in requests.items():
            g = float(wants[k]) if step >= len(r.loads) else min(float(wants[k]), r.loads[step])
            goal[k] = g
        while left > 0:
            best, best_key = None, None
            for k in requests:
                cap_k = min(wants[k], _replicas(goal[k]))
                if alloc[k] >= cap_k:
                    continue
                held = stickiness if alloc[k] < requests[k].current else 0.0
                key = (goal[k] - alloc[k] + held, requests[k].current, k)
                if best_key is None or key > best_key:
                    best, best_key = k, key
            if best is None:
                break
            alloc[best] += 1
            left -= 1
    return alloc


def decide_all(snaps: Mapping[str, Snapshot], states: Mapping[str, State], knobs: Knobs = Knobs(),
               total_cap: int | None = None, stickiness: float = 0.5) -> dict[str, Decision]:
    """``decide`` for every model, then ``allocate`` under ``total_cap`` (None: no budget).

    A model the budget holds below its own decision gets reason "budget"; the state's
    ``last_change_s`` follows the target finally returned.
    """
    own = {k: decide(s, states.get(k, State()), knobs) for k, s in snaps.items()}
    if total_cap is None:
        return own
    grants = allocate({k: BudgetRequest.of(snaps[k], d, knobs) for k, d in own.items()}, total_cap,
                      stickiness)
    out: dict[str, Decision] = {}
    for k, d in own.items():
        final = grants[k]
        if final == d.target:
            out[k] = d
            continue
        cur = snaps[k].current_target
        prev = states.get(k, State()).last_change_s
        st = replace(d.state, last_change_s=snaps[k].now if final != cur else prev)
        out[k] = replace(d, target=final, reason="budget", state=st)
    return out

"""The adaptive limit: ramps with doubling traffic, stops bursts, decays when idle. Fake clock."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from policies.rate_limit import (
    BUDGETS,
    Budgets,
    RampRule,
    RequestBucket,
    SizeClass,
    bounds,
    decide,
    settle,
    size_class,
)

FLOOR, CEIL = bounds(SizeClass.SMALL, 1)
RULE = RampRule()


def _cost(prompt: float, cached: float = 0, gen: float = 0) -> dict[str, float]:
    return {"prompt": prompt, "uncached": prompt - cached, "generated": gen}


def test_size_classes_and_tiers():
    assert size_class(8) is SizeClass.SMALL
    assert size_class(671) is SizeClass.MEDIUM
    assert size_class(2000) is SizeClass.LARGE
    f1, c1 = bounds(SizeClass.SMALL, 1)
    _, c4 = bounds(SizeClass.SMALL, 4)
    assert c4.prompt == 8 * c1.prompt and f1.prompt < c1.prompt
    assert bounds(SizeClass.LARGE, 1)[1].prompt < c1.prompt


@settings(max_examples=12, deadline=None)
@given(st.floats(0.05, 0.5), st.floats(1.0, 30.0), st.floats(0.0, 0.9))
def test_traffic_doubling_every_hour_never_sees_a_429(start_fraction, step, cached_share):
    """Start below the floor, double every hour for 4 hours (16×), a request every `step` s."""
    states, now = {}, 0.0
    rate0 = start_fraction * FLOOR.generated  # tokens per minute, each budget scaled alike
    while now < 4 * 3600:
        per_req = rate0 * 2 ** (now / 3600) / 60.0 * step
        prompt = per_req * FLOOR.prompt / FLOOR.generated
        cost = {"prompt": prompt, "uncached": prompt * (1 - cached_share) * FLOOR.uncached / FLOOR.prompt,
                "generated": per_req}
        d = decide(states, cost, now, FLOOR, CEIL, RULE)
        assert d.allowed, (now, d.exhausted, d.limits)
        states = d.states
        now += step


def _ramp_up(minutes: int, per_minute: float) -> tuple[dict, float]:
    states, now = {}, 0.0
    for _ in range(minutes * 6):
        d = decide(states, _cost(per_minute / 6, 0, per_minute / 60), now, FLOOR, CEIL, RULE)
        states = d.states if d.allowed else states
        now += 10
    return states, now


def test_a_ten_times_burst_is_limited_within_the_minute():
    rate = FLOOR.prompt * 0.8
    states, now = _ramp_up(60, rate)
    limit_before = states["prompt"].limit
    admitted, refused_at = 0.0, None
    t = now
    while t < now + 60:  # 10× the steady rate for one minute, in 100 requests
        d = decide(states, _cost(rate * 10 / 100), t, FLOOR, CEIL, RULE)
        if d.allowed:
            admitted += rate * 10 / 100
            states = d.states
        elif refused_at is None:
            refused_at = t - now
            assert d.exhausted == "prompt" and d.retry_after_s > 0
        t += 0.6
    assert refused_at is not None and refused_at < 60
    # What gets through in that minute: the bucket plus one minute of refill, both near the old limit.
    assert admitted <= 2.1 * limit_before
    assert admitted < 0.45 * rate * 10


def test_after_an_idle_hour_the_limit_is_back_near_the_floor():
    states, now = _ramp_up(120, FLOOR.prompt * 0.9)
    # Keep the bucket busy for two hours: the limit grew well above the floor.
    assert states["prompt"].limit > 1.5 * FLOOR.prompt
    d = decide(states, _cost(1), now + 3600, FLOOR, CEIL, RULE)
    for b in BUDGETS:
        assert d.limits[b] <= 1.05 * FLOOR.get(b)


def test_saturated_limit_grows_no_faster_than_the_speed_bound_and_stops_at_the_ceiling():
    states, now = {}, 0.0
    limits = []
    for minute in range(6 * 60):
        for _ in range(6):
            lim = states["prompt"].limit if states else FLOOR.prompt
            d = decide(states, _cost(lim / 4, 0, 1), now, FLOOR, CEIL, RULE)  # always asks for more
            if d.allowed:
                states = d.states
            now += 10
        limits.append(states["prompt"].limit)
    assert limits[19] <= FLOOR.prompt * 2 * 1.01  # at most doubles in 20 min
    assert 0.95 * CEIL.prompt <= limits[-1] <= CEIL.prompt


def test_a_request_larger_than_the_limit_is_refused_not_queued():
    d = decide({}, {"prompt": FLOOR.prompt * 3}, 0.0, FLOOR, CEIL, RULE)
    assert not d.allowed and d.exhausted == "prompt"
    assert math.isclose(d.retry_after_s, 120.0, rel_tol=1e-3)


def test_settle_refunds_what_was_not_used():
    d = decide({}, _cost(1000, 0, 500), 0.0, FLOOR, CEIL, RULE)
    assert d.remaining["generated"] == FLOOR.generated - 500
    after = settle(d.states, {"uncached": 800, "generated": 450}, 0.0, FLOOR, CEIL, RULE)
    assert int(after["generated"].available) == FLOOR.generated - 50
    assert int(after["uncached"].available) == FLOOR.uncached - 200


def test_remaining_and_limits_are_reported_per_budget():
    d = decide({}, _cost(100, 40, 10), 5.0, FLOOR, CEIL, RULE)
    assert d.allowed
    assert d.limits == {"prompt": int(FLOOR.prompt), "uncached": int(FLOOR.uncached),
                        "generated": int(FLOOR.generated)}
    assert d.remaining == {"prompt": int(FLOOR.prompt) - 100, "uncached": int(FLOOR.uncached) - 60,
                           "generated": int(FLOOR.generated) - 10}


def test_request_bucket_is_a_fixed_rpm_cap():
    b = RequestBucket.fresh(60, 0.0)
    for _ in range(50):
        got, _, b = b.take(60, 0.0)
        assert got == 1
    got, _, b = b.take(60, 0.0, n=25)  # only 10 left
    assert got == 10
    got, wait, b = b.take(60, 0.0)
    assert got == 0 and math.isclose(wait, 1.0)
    got, _, b = b.take(60, 1.0)
    assert got == 1


def test_budgets_value_object():
    assert Budgets(1, 2, 3).scaled(2) == Budgets(2, 4, 6)

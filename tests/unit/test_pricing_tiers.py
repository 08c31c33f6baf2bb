"""Prices, spend tiers, the monthly limit and load shedding: table tests of the pure rules."""

from __future__ import annotations

import math

import pytest

from policies.pricing import Price, request_cost, spend_status, spend_tier
from policies.tiers import ENGINE_PRIORITY, priority_reserve_slots, shed, usable_slots

P = Price(input=0.90, cached_input=0.45, output=0.90)


def test_worked_example_cost_and_batch_discount():
    assert math.isclose(request_cost(P, 1000, 600, 200), 0.00081)
    assert math.isclose(request_cost(P, 1000, 600, 200, discount=0.5), 0.000405)
    assert request_cost(P, 0, 0, 0) == 0


@pytest.mark.parametrize("spend, granted, tier", [
    (0, None, 1), (49.99, None, 1), (50, None, 2), (499, None, 2), (500, None, 3), (5000, None, 4),
    (10, 3, 3), (600, 2, 3), (0, 5, 5),
])
def test_spend_tiers(spend, granted, tier):
    assert spend_tier(spend, granted) == tier


@pytest.mark.parametrize("month, limit, status", [
    (10, None, "ok"), (79.9, 100, "ok"), (80, 100, "warn"), (99.99, 100, "warn"), (100, 100, "stop"),
    (150, 100, "stop"),
])
def test_monthly_limit(month, limit, status):
    assert spend_status(month, limit) == status


def test_worked_example_shedding():
    # 16 slots, 12 usable by Standard; 14 in flight + 2 queued ahead.
    d = shed("standard", 16, 16, 0.6, 0.5, 4, priority_reserve=0.25)
    assert math.isclose(d.expected_wait_s, 5 * 0.6 / 12) and d.admit
    assert shed("priority", 14, 16, 0.6, 0.5, 4, priority_reserve=0.25).expected_wait_s == 0
    assert not shed("standard", 30, 16, 0.6, 0.5, 4, priority_reserve=0.25).admit
    assert shed("priority", 30, 16, 0.6, 0.5, 4, priority_reserve=0.25).admit
    assert not shed("batch", 16, 16, 0.5, 0.5, 4).admit
    assert shed("batch", 3, 16, 0.5, 0.5, 4).admit
    assert usable_slots("standard", 16, 0.25) == 12 and usable_slots("priority", 16, 0.25) == 16
    assert usable_slots("standard", 1, 0.9) == 1
    assert ENGINE_PRIORITY["priority"] < ENGINE_PRIORITY["standard"] < ENGINE_PRIORITY["batch"]


def test_priority_is_shed_last():
    for ahead in range(0, 200):
        s = shed("standard", ahead, 16, 0.3, 0.5, 4, 0.25).admit
        p = shed("priority", ahead, 16, 0.3, 0.5, 4, 0.25).admit
        assert p or not s  # whenever Priority is shed, Standard is too


@pytest.mark.parametrize("slots, reserve, peak, expected", [
    (16, 0.25, 0, 4),    # no Priority lately: the configured share
    (16, 0.25, 2, 4),    # Priority within the share: unchanged
    (16, 0.25, 6, 7),    # Priority's peak plus one
    (16, 0.25, 15, 15),  # Standard keeps one slot
    (16, 0.0, 0, 0),     # no reserve configured, no Priority: nothing held back
    (1, 0.25, 3, 0),     # a one-slot pool: Standard keeps its slot
])
def test_the_priority_reserve_follows_prioritys_recent_peak(slots, reserve, peak, expected):
    assert priority_reserve_slots(slots, reserve, peak) == expected

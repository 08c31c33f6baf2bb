"""The Virtual Token Counter: order by weighted tokens served, lift on joining, the VTC bound."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.fair_share import TokenWeights, VirtualTokenCounter, under_fair_share, vtc_bound


def test_a_generated_token_weighs_twice_a_prompt_token_by_default():
    assert TokenWeights().cost(100, 50) == 200
    assert TokenWeights(input=1, output=4).cost(100, 50) == 300


def test_the_least_served_waiting_account_goes_next():
    vtc = VirtualTokenCounter()
    vtc.charge("a", 500, 0)
    vtc.charge("b", 100, 0)
    vtc.join("a")
    vtc.join("b")  # b joins while a waits: lifted to the least waiting counter, a's
    assert vtc.counter("b") == 500
    assert vtc.next_account() == "a"  # tie: a was served less recently
    vtc.leave("a")
    vtc.charge("a", 10, 0)
    assert vtc.next_account() == "b"


def test_a_returning_account_cannot_bank_credit():
    vtc = VirtualTokenCounter()
    for _ in range(10):  # a is served a lot while b is away
        vtc.join("a")
        vtc.leave("a")
        vtc.charge("a", 100, 0)
    vtc.join("a")
    vtc.join("b")  # b returns: lifted to a's counter, not left at 0
    assert vtc.counter("b") == vtc.counter("a") == 1000
    order = []
    for _ in range(4):
        nxt = vtc.next_account()
        order.append(nxt)
        vtc.charge(nxt, 100, 0)  # both stay backlogged
    assert order == ["b", "a", "b", "a"]  # level; the tie goes to b, served least recently


def test_with_nobody_waiting_a_joining_account_is_lifted_to_the_last_one_that_left():
    vtc = VirtualTokenCounter()
    vtc.join("a")
    vtc.charge("a", 700, 0)
    vtc.leave("a")
    vtc.join("new")
    assert vtc.counter("new") == 700


def test_an_account_alone_is_always_next():
    vtc = VirtualTokenCounter()
    for _ in range(5):
        vtc.join("solo")
    for _ in range(5):
        assert vtc.next_account() == "solo"
        vtc.leave("solo")
        vtc.charge("solo", 1000, 1000)
    assert vtc.next_account() is None


def test_correcting_an_overestimate_gives_the_account_its_place_back():
    vtc = VirtualTokenCounter()
    vtc.join("a")
    vtc.join("b")
    charged = vtc.charge("a", 10, 500)  # estimate: max_tokens 500
    assert vtc.next_account() == "b"
    vtc.correct("a", charged, 10, 5)  # it stopped after 5 tokens
    assert vtc.counter("a") == 20
    vtc.charge("b", 10, 10)
    assert vtc.next_account() == "a"


def test_the_bound_is_twice_the_larger_of_max_input_and_weighted_max_output():
    assert vtc_bound(1000, 100) == 2000
    assert vtc_bound(100, 300) == 1200


def test_forgetting_idle_counters_changes_no_decision():
    pruned, kept = VirtualTokenCounter(), VirtualTokenCounter()
    pruned._prune_at, kept._prune_at = 4, 10**9
    for vtc in (pruned, kept):
        for i in range(10):
            vtc.join(f"a{i % 7}")
            vtc.charge(f"a{i % 7}", i, 0)
            vtc.leave(f"a{i % 7}")  # each leaves at once: the queue empties every time
        vtc.join("a0")
        vtc.join("late")
    assert len(pruned.counters) < len(kept.counters)
    assert pruned.counter("late") == kept.counter("late") == 45  # lifted to the last one that left
    assert pruned.counter("a0") == kept.counter("a0")


requests = st.lists(st.tuples(st.integers(1, 400), st.integers(1, 200)), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(a_reqs=requests, b_reqs=requests, steps=st.integers(1, 200), head_start=st.integers(0, 30))
def test_two_backlogged_accounts_stay_within_the_vtc_bound(a_reqs, b_reqs, steps, head_start):
    """a runs alone for a while; then both are backlogged throughout: the weighted tokens each is
    served from b's arrival on differ by at most the VTC bound, at every step."""
    w = TokenWeights()
    vtc = VirtualTokenCounter(w)
    reqs = {"a": a_reqs, "b": b_reqs}
    nxt = {"a": 0, "b": 0}

    def serve(acct: str) -> float:
        inp, out = reqs[acct][nxt[acct] % len(reqs[acct])]
        nxt[acct] += 1
        vtc.join(acct)  # another request arrives before this one leaves: always backlogged
        vtc.leave(acct)
        return vtc.charge(acct, inp, out)

    vtc.join("a")
    for _ in range(head_start):
        serve("a")
    vtc.join("b")
    served = {"a": 0.0, "b": 0.0}
    max_in = max(i for i, _ in a_reqs + b_reqs)
    max_out = max(o for _, o in a_reqs + b_reqs)
    bound = vtc_bound(max_in, max_out, w)
    for _ in range(steps):
        acct = vtc.next_account()
        served[acct] += serve(acct)
        assert abs(served["a"] - served["b"]) <= bound


@settings(max_examples=100, deadline=None)
@given(reqs=st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 300), st.integers(1, 100),
                               st.integers(0, 100)), min_size=1, max_size=60))
def test_counters_end_at_the_real_usage_after_corrections(reqs):
    """Estimates charged at dispatch and corrected at the end leave each counter at the weighted
    tokens really used (no lift: every account stays waiting from the start)."""
    vtc = VirtualTokenCounter()
    for acct in "abc":
        vtc.join(acct)
    used = {a: 0.0 for a in "abc"}
    for acct, inp, max_out, out_pct in reqs:
        charged = vtc.charge(acct, inp, max_out)
        real_out = max_out * out_pct // 100
        vtc.correct(acct, charged, inp, real_out)
        used[acct] += TokenWeights().cost(inp, real_out)
    for acct in "abc":
        assert vtc.counter(acct) == pytest.approx(used[acct])
    assert vtc.counter(vtc.next_account()) == pytest.approx(min(used.values()))


def test_under_a_fair_share_means_wanting_less_than_another_account_holds():
    assert under_fair_share(1, 12) and under_fair_share(4, 12)  # a quiet burst beside a noisy holder
    assert under_fair_share(7, 8) and not under_fair_share(8, 8)  # two accounts wanting 8 each: level
    assert not under_fair_share(1, 1)  # light accounts of one request each: level with each other
    assert not under_fair_share(9, 0)  # an account alone
    assert not under_fair_share(0, 5)  # nothing wanted

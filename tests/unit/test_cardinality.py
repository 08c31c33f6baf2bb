"""Account label values are capped: the top N by decayed traffic, everyone else "other"."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from policies.cardinality import OTHER, AccountLabels


def test_the_first_n_accounts_take_the_free_places_at_once():
    labels = AccountLabels(top_n=2, refresh_s=60)
    assert [labels.label(a, 0.0) for a in "abc"] == ["a", "b", OTHER]
    assert labels.named() == {"a", "b"}


def test_membership_follows_traffic_at_the_next_refresh_not_before():
    labels = AccountLabels(top_n=2, refresh_s=60, half_life_s=600)
    for a in "abc":
        labels.label(a, 0.0)
    for i in range(50):
        t = 1.0 + i
        assert labels.label("c", t) == OTHER  # no refresh within the minute: no flapping
        if i < 10:
            labels.label("a", t)
    assert labels.label("c", 61.0) == "c"  # the refresh: c and a have the most traffic
    assert labels.named() == {"a", "c"}
    assert labels.label("b", 62.0) == OTHER


def test_an_idle_account_decays_out_of_the_top():
    labels = AccountLabels(top_n=1, refresh_s=10, half_life_s=60)
    for i in range(100):
        labels.label("old", float(i))  # 100 requests early on
    t = 3600.0  # an hour later: 60 half-lives
    assert labels.label("new", t) == "new"  # one request now outweighs 100 an hour ago
    assert labels.label("old", t + 1) == OTHER


def test_weights_count_like_requests():
    labels = AccountLabels(top_n=1, refresh_s=1)
    labels.label("heavy", 0.0, weight=1.0)
    labels.label("light", 0.5, weight=1.0)
    labels.label("light", 0.6, weight=1.0)
    labels.label("heavy", 0.7, weight=100.0)
    assert labels.label("light", 2.0) == OTHER
    assert labels.named() == {"heavy"}


def test_scores_survive_a_rebase_without_losing_the_order():
    labels = AccountLabels(top_n=1, refresh_s=1, half_life_s=1)
    labels.label("a", 0.0, weight=3)
    labels.label("b", 0.0, weight=1)
    labels.label("a", 600.0, weight=3)  # exponent 600 > the rebase threshold
    labels.label("b", 600.0, weight=1)
    assert labels.label("b", 601.0) == OTHER
    assert labels.named() == {"a"}


def test_tracked_accounts_are_bounded():
    labels = AccountLabels(top_n=2, max_tracked=10)
    for i in range(1000):
        labels.label(f"acct-{i}", float(i))
    assert len(labels._scores) <= 10


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 5), calls=st.lists(st.tuples(st.integers(0, 30), st.floats(0, 5)), max_size=300))
def test_never_more_than_n_plus_one_distinct_values(n, calls):
    labels = AccountLabels(top_n=n, refresh_s=2, half_life_s=5)
    seen_at_once: set[str] = set()
    t = 0.0
    for account, dt in calls:
        t += dt
        seen_at_once.add(labels.label(f"a{account}", t))
        assert len(labels.named()) <= n
    # Over time the named set changes, but each label call returns a name in the top N or "other".
    assert all(v == OTHER or v.startswith("a") for v in seen_at_once)

"""Consistent hashing with bounded loads: load bound, movement bound, determinism."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.consistent_hash import HashRing, load_cap, place, stable_hash

node_names = st.lists(st.text("abcdefgh0123456789", min_size=1, max_size=8), min_size=1, max_size=12,
                      unique=True)


@settings(max_examples=200, deadline=None)
@given(node_names, st.lists(st.one_of(st.none(), st.integers(0, 60), st.just(-1)), max_size=300),
       st.floats(1.0, 2.0), st.one_of(st.none(), st.integers(1, 5)))
def test_no_placement_ever_exceeds_the_cap(nodes, ops, c, group_replicas):
    """Ops: an int is a request for that session key, None is keyless, -1 completes one request.
    With ``group_replicas`` the keys belong to three groups (accounts) with that many homes."""
    ring = HashRing(nodes)
    loads = {n: 0 for n in nodes}
    rng = random.Random(0)
    for op in ops:
        if op == -1:
            busy = [n for n, v in loads.items() if v]
            if busy:
                loads[rng.choice(busy)] -= 1
            continue
        p = place(ring, loads, None if op is None else f"s{op}", load_factor=c, tie_break=rng.randrange(99),
                  group=None if op is None else f"account-{op % 3}", group_replicas=group_replicas)
        loads[p.replica] += 1
        assert loads[p.replica] <= p.cap == load_cap(sum(loads.values()) - 1, len(nodes), c)


@settings(max_examples=50, deadline=None)
@given(node_names, st.permutations(range(5)))
def test_every_ingress_computes_the_same_owner(nodes, _perm):
    shuffled = list(nodes)
    random.Random(len(nodes)).shuffle(shuffled)
    a, b = HashRing(nodes), HashRing(shuffled)
    for k in range(200):
        key = f"session-{k}"
        assert place(a, {}, key) == place(b, {}, key)


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_adding_a_replica_moves_about_one_nth_of_keys_and_only_to_it(n):
    keys = [f"k{i}" for i in range(4000)]
    before = HashRing([f"r{i}" for i in range(n)])
    after = HashRing([f"r{i}" for i in range(n + 1)])
    moved = [k for k in keys if place(before, {}, k).replica != place(after, {}, k).replica]
    assert all(place(after, {}, k).replica == f"r{n}" for k in moved)
    expected = len(keys) / (n + 1)
    assert 0.5 * expected <= len(moved) <= 1.6 * expected


def test_removing_a_replica_moves_only_its_keys():
    keys = [f"k{i}" for i in range(3000)]
    full = HashRing([f"r{i}" for i in range(6)])
    less = HashRing([f"r{i}" for i in range(6) if i != 3])
    for k in keys:
        was = place(full, {}, k).replica
        if was != "r3":
            assert place(less, {}, k).replica == was


def test_one_hot_replica_diverts_only_its_own_keys():
    ring = HashRing([f"r{i}" for i in range(4)])
    keys = [f"k{i}" for i in range(400)]
    owner = {k: place(ring, {}, k).replica for k in keys}
    loads = {"r0": 10, "r1": 1, "r2": 1, "r3": 1}  # cap = ceil(1.25*14/4) + 1 = 6
    for k in keys:
        p = place(ring, loads, k)
        if owner[k] == "r0":
            assert p.replica != "r0" and p.reason in ("alternate", "least_loaded")
        else:
            assert p.replica == owner[k] and p.reason == "owner"


def test_keyless_requests_go_to_the_least_loaded():
    ring = HashRing(["a", "b", "c"])
    assert place(ring, {"a": 3, "b": 0, "c": 2}, None).replica == "b"
    ties = {place(ring, {"a": 1, "b": 1, "c": 5}, None, tie_break=t).replica for t in range(4)}
    assert ties == {"a", "b"}


def test_worked_example_from_the_docstring():
    ring = HashRing(["a", "b", "c", "d"])
    loads = {"a": 5, "b": 1, "c": 1, "d": 1}
    assert load_cap(8, 4) == 4
    hot = next(k for k in (f"k{i}" for i in range(1000)) if place(ring, {}, k).replica == "a")
    assert place(ring, loads, hot).replica in {"b", "c", "d"}


def test_replica_slots_keep_requests_out_of_a_full_replicas_queue():
    ring = HashRing(["a", "b"])
    key = next(k for k in (f"k{i}" for i in range(1000)) if place(ring, {}, k).replica == "a")
    # Load cap alone (ceil(1.25 * 14 / 2) + 1 = 10) would still admit to a, whose 8 slots are full.
    assert place(ring, {"a": 8, "b": 5}, key).replica == "a"
    assert place(ring, {"a": 8, "b": 5}, key, replica_slots=8).replica == "b"
    # When every replica is full, the plain bound applies again.
    assert place(ring, {"a": 8, "b": 8}, key, replica_slots=8).replica == "a"


# -- account homes: a group's keys share a few replicas -------------------------------------------

@settings(max_examples=50, deadline=None)
@given(node_names, st.integers(1, 5))
def test_every_ingress_computes_the_same_grouped_owner(nodes, k):
    shuffled = list(nodes)
    random.Random(len(nodes)).shuffle(shuffled)
    a, b = HashRing(nodes), HashRing(shuffled)
    for i in range(200):
        kw = {"group": f"account-{i % 7}", "group_replicas": k}
        assert place(a, {}, f"session-{i}", **kw) == place(b, {}, f"session-{i}", **kw)


def test_a_groups_keys_share_its_homes_and_spill_to_the_next_home_first():
    ring = HashRing([f"r{i}" for i in range(8)])
    owners = {place(ring, {}, f"s{i}", group="acme", group_replicas=3).replica for i in range(300)}
    assert len(owners) == 3
    assert owners == set(ring.successors(stable_hash("acme"), 3))
    # The key's owner is full: it goes to another home, which caches the account's prefix too.
    first = place(ring, {}, "s0", group="acme", group_replicas=3)
    loads = {n: 0 for n in ring.nodes} | {first.replica: 5}
    second = place(ring, loads, "s0", group="acme", group_replicas=3)
    assert second.reason == "home" and second.replica in owners - {first.replica}
    # All homes full: an alternate outside them, as for ungrouped keys.
    loads = {n: 0 for n in ring.nodes} | {n: 5 for n in owners}
    third = place(ring, loads, "s0", group="acme", group_replicas=3)
    assert third.reason == "alternate" and third.replica not in owners
    # A group allowed the whole pool is plain consistent hashing.
    assert place(ring, {}, "s0", group="acme", group_replicas=8) == place(ring, {}, "s0")


@pytest.mark.parametrize("n,k", [(4, 2), (8, 3), (16, 3), (16, 8)])
def test_adding_a_replica_moves_about_two_nths_of_grouped_keys(n, k):
    keys = [(f"account-{g}", f"k{g}-{i}") for g in range(300) for i in range(20)]
    before = HashRing([f"r{i}" for i in range(n)])
    after = HashRing([f"r{i}" for i in range(n + 1)])
    moved = sum(place(before, {}, key, group=g, group_replicas=k).replica
                != place(after, {}, key, group=g, group_replicas=k).replica for g, key in keys)
    expected = len(keys) * (2 - 1 / k) / (n + 1)  # a home set changes (k/(n+1)); 2/k - 1/k^2 of its keys move
    assert 0.6 * expected <= moved <= 1.4 * expected

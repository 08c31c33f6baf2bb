"""The prefix-cache model follows vLLM's matching rules (block chains, last-token recompute, LRU)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from policies.prefix_cache import PrefixCache, block_hashes

tokens = st.lists(st.integers(0, 50), min_size=1, max_size=300)


def test_worked_example_from_the_docstring():
    cache = PrefixCache(block_size=4, capacity_tokens=1024)
    prompt = list(range(10))
    h = block_hashes(prompt, 4)
    assert len(h) == 2
    assert cache.match(h, 10) == 0
    cache.insert(h)
    assert cache.match(h, 10) == 8
    assert cache.match(block_hashes(prompt[:9], 4), 9) == 8
    assert cache.match(block_hashes(prompt[:8], 4), 8) == 4


def test_salt_isolates_and_chaining_requires_the_whole_prefix():
    cache = PrefixCache(block_size=4, capacity_tokens=1024)
    p = list(range(20))
    cache.insert(block_hashes(p, 4, salt="acct-a"))
    assert cache.match(block_hashes(p, 4, salt="acct-a"), 20) == 16
    assert cache.match(block_hashes(p, 4, salt="acct-b"), 20) == 0
    changed_first = [99] + p[1:]
    assert cache.match(block_hashes(changed_first, 4, salt="acct-a"), 20) == 0


def test_lru_evicts_tails_first_and_respects_capacity():
    cache = PrefixCache(block_size=2, capacity_tokens=8)  # 4 blocks
    a = block_hashes(list(range(8)), 2)
    cache.insert(a)
    b = block_hashes(list(range(100, 104)), 2)
    cache.insert(b)  # evicts a's two tail blocks, keeps its head
    assert len(cache) == 4 and cache.evictions == 2
    assert cache.match(a, 9) == 4
    assert cache.match(b, 5) == 4


@settings(max_examples=200, deadline=None)
@given(tokens, st.integers(1, 16), st.text(max_size=5))
def test_cached_tokens_are_whole_blocks_below_the_prompt(prompt, bs, salt):
    cache = PrefixCache(block_size=bs, capacity_tokens=bs * 1000)
    h = block_hashes(prompt, bs, salt)
    assert h == block_hashes(prompt, bs, salt)  # deterministic
    assert len(h) == len(prompt) // bs
    cache.insert(h)
    got = cache.match(h, len(prompt))
    assert got % bs == 0
    assert got == (len(prompt) - 1) // bs * bs
    assert got < len(prompt)


@settings(max_examples=100, deadline=None)
@given(st.lists(tokens, min_size=1, max_size=20), st.integers(1, 8), st.integers(1, 40))
def test_capacity_is_never_exceeded(prompts, bs, cap_blocks):
    cache = PrefixCache(block_size=bs, capacity_tokens=bs * cap_blocks)
    for p in prompts:
        cache.insert(block_hashes(p, bs))
        assert len(cache) <= cap_blocks

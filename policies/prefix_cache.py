"""A model of vLLM's prefix cache: chained block hashes, LRU eviction, capacity in tokens.

vLLM caches KV in fixed-size blocks. A full block is identified by the hash of its tokens chained
to the hash of the block before it (and, for the first block, the request's cache salt), so a
block only matches when the whole prefix before it matches too. Partial blocks are never cached.

Two vLLM rules matter for matching its ``num_cached_tokens``:

- When every prompt block hits, vLLM still recomputes the last prompt token to get logits, so at
  most ``(len(prompt) - 1) // block_size`` blocks count as cached.
- The KV of the last sampled token is never computed, so a finished request leaves behind the
  full blocks of ``prompt + output[:-1]``.

Worked example, block_size 4: a prompt of 10 tokens has 2 full blocks. The first call caches
nothing; afterwards both blocks are cached. The same prompt again reports ``(10-1)//4*4 = 8``
cached tokens. A 9-token prompt that is a prefix reports ``(9-1)//4*4 = 8`` as well, while an
8-token prefix reports only ``(8-1)//4*4 = 4``.

Simplification against vLLM: blocks in use by a running request may be evicted here; vLLM pins
them. With capacity well above ``max_num_seqs * context`` the two agree.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Sequence


def salt_seed(salt: str | None) -> int:
    """A process-independent integer for a salt (Python's str hash is randomised per process)."""
    if salt is None:
        return 0
    return int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest(), "big")


def block_hashes(token_ids: Sequence[int], block_size: int, salt: str | None = None) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids``.

    Hashing tuples of ints is deterministic across processes, so every replica and every ingress
    computes the same hashes without shared state.
    """
    out: list[int] = []
    parent = salt_seed(salt)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start:start + block_size])))
        out.append(parent)
    return out


class PrefixCache:
    """LRU set of block hashes with a capacity in tokens."""

    def __init__(self, block_size: int, capacity_tokens: int):
        if block_size < 1 or capacity_tokens < block_size:
            raise ValueError("need block_size >= 1 and capacity_tokens >= block_size")
        self.block_size = block_size
        self.capacity_blocks = capacity_tokens // block_size
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: Sequence[int], num_prompt_tokens: int) -> int:
        """Cached prompt tokens for a prompt whose full-block hashes are ``hashes``.

        Pure lookup: the request's ``insert`` calls refresh recency, as vLLM re-frees a request's
        blocks when it ends.
        """
        limit = max(0, (num_prompt_tokens - 1) // self.block_size)
        hit = 0
        blocks = self._blocks
        for h in hashes[:limit]:
            if h not in blocks:
                break
            hit += 1
        return hit * self.block_size

    def insert(self, hashes: Sequence[int]) -> None:
        """Record computed blocks as cached, evicting the least recently used beyond capacity.

        Like vLLM's free queue, a request's blocks are refreshed tail first, so under pressure a
        prefix loses its last blocks before its first ones.
        """
        blocks = self._blocks
        for h in reversed(hashes):
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)
            self.evictions += 1

"""Consistent hashing with bounded loads, for session affinity across a model pool.

A key (a session) belongs to the replica that owns its point on a hash ring of virtual nodes, so
every ingress replica computes the same owner with no shared state, and adding or removing one
of N replicas moves only about 1/N of the keys. Affinity must not overload anyone, so each
replica may hold at most

    cap = ceil(c * (in_flight_total + 1) / N) + 1       (c = 1.25 by default)

requests, counting the one being placed, plus one (see ``load_cap``). When the owner is at its cap the key overflows to the
less loaded of two *alternates* picked by independent hashes of the key (power of two choices),
not to the next replica on the ring: walking the ring would pile every overflow of a hot owner
onto its neighbour and cascade. If both alternates are full too, the least loaded replica takes
it; that one is always under the cap, because the minimum load is at most the mean. The bound is
per replica: a full owner only diverts its own keys, and all other keys keep their affinity.

Keys may belong to a *group* (Ember passes the account). A group's keys share its ``group_replicas``
*homes*: the first distinct replicas clockwise from the group's own point on the ring. A key's
owner is the home that ranks first for it by rendezvous hashing (highest ``hash(key, replica)``),
and while that one is full the key goes to its next-ranked home before any alternate. What a
group's sessions share (an account's system prompt and tools) is then cached on a few replicas,
not on every one. Moving one replica in or out changes a group's homes with probability about
``group_replicas / N``, and then about ``2 / group_replicas`` of its keys move (the leaving home's
and the arriving one's), so about 2/N of grouped keys move against 1/N of plain ones.

Worked example: 4 replicas with loads a=5, b=1, c=1, d=1 and c=1.25. The cap for the next request
is ceil(1.25 * 9 / 4) + 1 = 4. A key owned by b goes to b (load 1 < 4). A key owned by a overflows:
its alternates might be c and d, both at 1, and it lands on one of them. Requests with no key go
to the least loaded replica.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping

DEFAULT_VNODES = 100
DEFAULT_LOAD_FACTOR = 1.25


def stable_hash(data: str) -> int:
    """64-bit hash that is the same in every process (Python's str hash is salted per process)."""
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Virtual nodes of each replica, sorted by hash."""

    def __init__(self, nodes: Iterable[str], vnodes: int = DEFAULT_VNODES):
        if vnodes < 1:
            raise ValueError("vnodes must be >= 1")
        self.nodes: tuple[str, ...] = tuple(sorted(set(nodes)))
        points = sorted((stable_hash(f"{node}#{i}"), node) for node in self.nodes for i in range(vnodes))
        self._hashes = [h for h, _ in points]
        self._owners = [n for _, n in points]

    def __len__(self) -> int:
        return len(self.nodes)

    def owner(self, key_hash: int) -> str:
        if not self._hashes:
            raise ValueError("the ring has no nodes")
        i = bisect.bisect_right(self._hashes, key_hash)
        return self._owners[i % len(self._owners)]

    def successors(self, key_hash: int, count: int) -> list[str]:
        """The first ``count`` distinct nodes clockwise from ``key_hash`` (all nodes if fewer)."""
        if not self._hashes:
            raise ValueError("the ring has no nodes")
        count = min(count, len(self.nodes))
        out: list[str] = []
        start = bisect.bisect_right(self._hashes, key_hash)
        for j in range(len(self._owners)):
            node = self._owners[(start + j) % len(self._owners)]
            if node not in out:
                out.append(node)
                if len(out) == count:
                    break
        return out


@dataclass(frozen=True, slots=True)
class Placement:
    replica: str
    reason: Literal["owner", "home", "alternate", "least_loaded", "keyless"]
    cap: int


def load_cap(total_in_flight: int, num_replicas: int, load_factor: float = DEFAULT_LOAD_FACTOR) -> int:
    """The most requests a replica may hold once this one is placed: ceil(c * mean) + 1.

    The + 1 matters at low load: with 3 requests on 8 replicas, ceil(1.25 * 4 / 8) alone is 1,
    so any replica already serving one session would turn every other session that hashes to it
    away, and affinity would be lost exactly when capacity is plentiful.
    """
    return math.ceil(load_factor * (total_in_flight + 1) / num_replicas) + 1


def place(
    ring: HashRing,
    loads: Mapping[str, int],
    key: str | None,
    *,
    load_factor: float = DEFAULT_LOAD_FACTOR,
    tie_break: int = 0,
    replica_slots: int | None = None,
    group: str | None = None,
    group_replicas: int | None = None,
) -> Placement:
    """Pick the replica for one request, given each replica's in-flight count.

    ``tie_break`` is any integer the caller draws (a random number, a counter); it only decides
    between equally loaded replicas, so the function stays pure and deterministic.
    ``replica_slots`` (a replica's running slots, vLLM's max_num_seqs) tightens the cap: a request
    never joins a replica's queue while another replica has a free slot.
    ``group`` with ``group_replicas`` places the key among its group's homes first (module doc);
    without them, or when the group may use every replica, the key's owner is its ring owner.
    """
    nodes = ring.nodes
    if not nodes:
        raise ValueError("no replicas to place on")
    total = sum(loads.get(n, 0) for n in nodes)
    cap = load_cap(total, len(nodes), load_factor)
    if replica_slots is not None and any(loads.get(n, 0) < replica_slots for n in nodes):
        cap = min(cap, replica_slots)
    if key is None:
        return Placement(_least_loaded(nodes, loads, tie_break), "keyless", cap)
    if group is not None and group_replicas is not None and group_replicas < len(nodes):
        homes = ring.successors(stable_hash(group), group_replicas)
        homes.sort(key=lambda n: stable_hash(f"{key}\x00{n}"), reverse=True)
    else:
        homes = [ring.owner(stable_hash(key))]
    for rank, home in enumerate(homes):
        if loads.get(home, 0) < cap:
            return Placement(home, "owner" if rank == 0 else "home", cap)
    others = [n for n in nodes if n not in homes]
    if others:
        a1 = others[stable_hash(key + "\x00alt1") % len(others)]
        a2 = others[stable_hash(key + "\x00alt2") % len(others)]
        best = a1 if loads.get(a1, 0) <= loads.get(a2, 0) else a2
        if loads.get(best, 0) < cap:
            return Placement(best, "alternate", cap)
    return Placement(_least_loaded(nodes, loads, tie_break), "least_loaded", cap)


def _least_loaded(nodes: tuple[str, ...], loads: Mapping[str, int], tie_break: int) -> str:
    low = min(loads.get(n, 0) for n in nodes)
    ties = [n for n in nodes if loads.get(n, 0) == low]
    return ties[tie_break % len(ties)]

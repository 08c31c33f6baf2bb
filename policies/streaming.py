"""How often a pool replica sends a stream's coalesced output (pure; no clock needed).

Every message a stream sends crosses two Serve hops (replica → ingress → proxy), and each costs
far more CPU than the tokens it carries: on the engine-path benchmark, sending a 64-token stream
every 50 ms instead of every 200 ms doubled the CPU Ember added per request. A fixed interval
makes a replica's message rate grow with the streams it runs, so the interval grows instead:
the replica's streams share a budget of messages per second. One stream alone still gets the
base interval (and every stream's first token leaves at once, whatever the interval).
"""

from __future__ import annotations


def stream_interval(streams: int, base_s: float, max_s: float, messages_per_s: float) -> float:
    """Seconds between a stream's messages when the replica runs ``streams`` streams.

    ``streams / messages_per_s`` keeps the replica at its message budget, never below ``base_s``
    (0 sends whatever is ready) nor above ``max_s`` (how coarse a stream may become).
    """
    if streams < 1 or messages_per_s <= 0:
        return base_s
    return max(base_s, min(max_s, streams / messages_per_s))

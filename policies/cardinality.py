"""Which accounts may appear as metric label values: the top N by recent traffic, the rest "other".

A label value per account would give a time series per account and per every other label
combination, which no Prometheus survives with many tenants. ``AccountLabels`` keeps the number
of distinct account values at ``top_n + 1`` however many accounts call.

Traffic is a decayed count: each request adds its weight, and past weight halves every
``half_life_s``. Scores are kept relative to a fixed origin (``w · 2^((t - origin) / half_life)``),
so comparing two accounts never needs decaying every score; they are rebased when the exponent
grows large.

Membership changes only at refreshes (every ``refresh_s``): a series does not flap between an
account's name and "other" on every request. Free places are given at once, in order of arrival,
so a quiet cluster names its first N accounts without waiting for a refresh.

Worked example (``top_n=2``, ``refresh_s=60``): a, b and c call at t=0; a and b take the two free
places, c is "other". Over the next minute c sends 50 requests, a 10, b none. At the refresh
(t ≥ 60) the top two by decayed count are c and a: c gets its name back, b becomes "other".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

OTHER = "other"
_REBASE_EXPONENT = 512.0  # 2^512 is far from float overflow; rebase before scores get there


@dataclass
class AccountLabels:
    top_n: int
    half_life_s: float = 600.0
    refresh_s: float = 60.0
    max_tracked: int = 0  # accounts whose traffic is counted (0: 8 × top_n, at least 64)
    _origin: float | None = None
    _scores: dict[str, float] = field(default_factory=dict)
    _top: set[str] = field(default_factory=set)
    _refreshed_at: float | None = None

    def __post_init__(self) -> None:
        if self.max_tracked <= 0:
            self.max_tracked = max(64, 8 * self.top_n)

    def label(self, account: str, now: float, weight: float = 1.0) -> str:
        """Count ``weight`` of traffic for ``account`` at ``now`` and return its label value."""
        self._count(account, now, weight)
        if self._refreshed_at is None or now - self._refreshed_at >= self.refresh_s:
            self._refresh(now)
        if account in self._top:
            return account
        if len(self._top) < self.top_n:
            self._top.add(account)
            return account
        return OTHER

    def named(self) -> set[str]:
        """The accounts that have their own label value now."""
        return set(self._top)

    def _count(self, account: str, now: float, weight: float) -> None:
        if self._origin is None:
            self._origin = now
        exponent = (now - self._origin) / self.half_life_s
        if exponent > _REBASE_EXPONENT:
            factor = 2.0 ** -exponent
            self._scores = {a: s * factor for a, s in self._scores.items()}
            self._origin, exponent = now, 0.0
        scores = self._scores
        if account not in scores and len(scores) >= self.max_tracked:
            # Forget the least-trafficked account that has no label of its own.
            victims = [a for a in scores if a not in self._top] or list(scores)
            del scores[min(victims, key=scores.__getitem__)]
        scores[account] = scores.get(account, 0.0) + weight * math.pow(2.0, exponent)

    def _refresh(self, now: float) -> None:
        self._refreshed_at = now
        ranked = sorted(self._scores, key=self._scores.__getitem__, reverse=True)
        self._top = set(ranked[: self.top_n])

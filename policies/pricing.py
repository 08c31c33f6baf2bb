"""Per-token prices, spend tiers and the monthly spend limit. Pure functions, USD.

Worked example: 1,000 prompt tokens of which 600 cached and 200 output tokens on a model priced
$0.90 input / $0.45 cached / $0.90 output per 1M tokens cost
(400 × 0.90 + 600 × 0.45 + 200 × 0.90) / 1e6 = $0.00081. The same request in a batch costs half.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Cumulative spend (USD) at which an account reaches each tier; tier 5 ("unlimited") is granted,
# never earned.
SPEND_TIER_THRESHOLDS = ((4, 5_000.0), (3, 500.0), (2, 50.0), (1, 0.0))
UNLIMITED_TIER = 5
WARN_FRACTION = 0.8


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens."""

    input: float
    cached_input: float
    output: float


def embedding_price(input_usd_per_m: float) -> Price:
    """An embedding model's row as a ``Price``: every input token at the one rate, nothing else.

    Example: 1,000 input tokens at $0.02 per 1M cost 1000 × 0.02 / 1e6 = $0.00002.
    """
    return Price(input=input_usd_per_m, cached_input=input_usd_per_m, output=0.0)


def request_cost(price: Price, prompt_tokens: int, cached_tokens: int, completion_tokens: int,
                 discount: float = 1.0) -> float:
    uncached = max(0, prompt_tokens - cached_tokens)
    usd = (uncached * price.input + cached_tokens * price.cached_input + completion_tokens * price.output) / 1e6
    return usd * discount


def spend_tier(cumulative_usd: float, granted: int | None = None) -> int:
    """The tier reached by spend, or a granted tier if that is higher."""
    earned = next(t for t, threshold in SPEND_TIER_THRESHOLDS if cumulative_usd >= threshold)
    return max(earned, granted or 0)


def spend_status(month_usd: float, monthly_limit_usd: float | None) -> Literal["ok", "warn", "stop"]:
    if monthly_limit_usd is None:
        return "ok"
    if month_usd >= monthly_limit_usd:
        return "stop"
    if month_usd >= WARN_FRACTION * monthly_limit_usd:
        return "warn"
    return "ok"


def spend_admits(month_usd: float, reserved_usd: float, worst_usd: float, monthly_limit_usd: float | None) -> bool:
    """Whether a request that may cost up to ``worst_usd`` fits under the monthly limit, counting
    what requests still running have reserved. Reserving the worst case at admission (and settling
    to the real cost at the end) is what keeps concurrent requests from overshooting the limit.

    Example: limit $10, $9.50 spent, two requests running with $0.20 reserved: a request that may
    cost $0.40 is refused (9.50 + 0.20 + 0.40 > 10); one that may cost $0.25 is admitted.
    """
    if monthly_limit_usd is None:
        return True
    return month_usd + reserved_usd + worst_usd <= monthly_limit_usd

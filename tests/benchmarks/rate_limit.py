"""Rate limiting: accuracy across ingress replicas, the adaptive ramp, and the cost of admission.

Goals, each printed as PASS or MISS:

1. **Accuracy.** A fixed limit (the model's ``limits`` floor == ceiling, 30,000 prompt tokens per
   minute by default; uncached and generated budgets far above it, so prompt is the binding
   budget) enforced by 4 ingress replicas against 64 bursty clients (asyncio + httpx: bursts of
   back-to-back requests, random pauses) on a zero-latency SimEngine pool, limiter state in Redis.
   Admitted prompt tokens (the sum of ``usage.prompt_tokens`` over 200 responses) in every full
   60 s window after the first minute (a token bucket starts full) are within ±2% of the limit.
   Also: counts of 200/429/other, and no 429 without ``Retry-After`` and ``X-Ratelimit-*``.
2. **Ramp.** Traffic that doubles every hour, from below the floor, for 6 simulated hours,
   through the real ``RateLimiter`` and four ``LimiterClient`` s (one per ingress replica) in
   this process on a simulated clock: no 429. Printed with the limit and usage at start, 10 min,
   1 h, 2 h, ...; plus the README tables (pure policy, small model, tier 1) for a caller that
   keeps its bucket saturated and for traffic that doubles every hour.
3. **Cost.** Latency added by admission: two apps side by side (same SimEngine pool config, one
   ingress replica each, access logs off), one with ``rate_limit.enabled`` false, in interleaved
   rounds of sequential (C=1) and moderately concurrent (C=8) non-streamed requests: p50 and p99
   of both and the difference. Goal: at most 1 ms added at p50.

    cd /work/main && HF_HUB_OFFLINE=1 .venv/bin/python tests/benchmarks/rate_limit.py          # ~5.5 min
    cd /work/main && HF_HUB_OFFLINE=1 .venv/bin/python tests/benchmarks/rate_limit.py --small  # ~2.5 min

Ray starts on ports it picks (never Redis's 6379); the benchmark's Redis database is
``--redis-url`` (db 14), whose ``ember:rl:*`` keys are deleted first. The JSON report goes to
``bench_results/rate_limit.json``. ``notebooks/rate_limit_ramp.ipynb`` plots ramps with
``simulate_limiter`` below.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script
import _common as C  # noqa: E402  (also puts the repo root on sys.path)

from cluster.config import ModelConfig, RateLimitConfig  # noqa: E402
from deployments.rate_limiter import LimiterClient, RateLimiter  # noqa: E402
from policies.rate_limit import (  # noqa: E402
    BUDGETS,
    RampRule,
    SizeClass,
    bounds,
)

DEMO_KEY = "ember-bench-key-0001"
ACC_MODEL = "accounts/ember/models/rl-accuracy"
COST_MODEL = "accounts/ember/models/rl-cost"

GOAL_ACCURACY_PCT = 2.0
GOAL_RAMP_429 = 0
GOAL_ADDED_P50_MS = 1.0

from cluster.analysis.ramp import (  # noqa: E402  (the simulator notebooks use too)
    HOUR,
    MARKS,
    README_MARKS,
    SIM_REQUEST,
    InProcessActor,
    doubling,
    markdown_table,
    policy_run,
    simulate_limiter,
)
from cluster.analysis.ramp import at as _at  # noqa: E402
from cluster.analysis.ramp import compact as _k  # noqa: E402


def run_ramp(args) -> dict:
    floor, ceiling = bounds(SizeClass.SMALL, 1)
    rule = RampRule()
    hours = args.ramp_hours
    start = args.ramp_start_fraction * floor.prompt
    marks = [(t, label) for t, label in MARKS if t <= hours * HOUR]
    print(f"\n== ramp: small model, tier 1 (floor {floor.prompt:,.0f} / {floor.uncached:,.0f} / "
          f"{floor.generated:,.0f}, ceiling {ceiling.prompt:,.0f} / {ceiling.uncached:,.0f} / "
          f"{ceiling.generated:,.0f} prompt / uncached / generated tokens per minute)", flush=True)

    t_wall = time.perf_counter()
    sim = simulate_limiter(doubling(start), hours * HOUR, n_clients=args.replicas, seed=args.seed)
    sim_wall = time.perf_counter() - t_wall
    print(f"real RateLimiter + {args.replicas} LimiterClients in-process, simulated clock: traffic doubling every "
          f"hour from {start:,.0f} prompt tokens/min ({args.ramp_start_fraction:g}x the floor), requests of "
          f"{SIM_REQUEST[0]} prompt ({SIM_REQUEST[1]} cached) + {SIM_REQUEST[2]} generated tokens, Poisson "
          f"arrivals; {sim['requests']:,} requests over {hours:g} h simulated in {sim_wall:.1f} s")
    rows = []
    cum429 = 0
    for s in sim["samples"]:
        cum429 += s["refused"]
        s["refused_cumulative"] = cum429
    for t, label in marks:
        s = _at(sim["samples"], t)
        # Admitted over the minute before the mark (the sample at t covers [t - 60, t)).
        rows.append([label, _k(s["traffic_per_min"]["prompt"]), _k(s["admitted_per_min"]["prompt"]),
                     _k(s["usage"]["prompt"]), _k(s["limit"]["prompt"]), _k(s["limit"]["uncached"]),
                     _k(s["limit"]["generated"]),
                     f"{s['limit']['prompt'] / s['traffic_per_min']['prompt']:.2f}x",
                     s["refused_cumulative"]])
    C.print_table(["time", "traffic prompt/min", "admitted (last min)", "usage prompt", "limit prompt",
                   "limit uncached", "limit generated", "limit/traffic", "429s so far"], rows)

    pure_doubling = policy_run(hours * HOUR, floor, ceiling, rule, rate_fn=doubling(start), step_s=1.0)
    pure_saturated = policy_run(hours * HOUR, floor, ceiling, rule, rate_fn=None, step_s=1.0)
    # How closely the leasing limiter follows the pure policy on the same traffic.
    diffs = []
    for t, _ in marks:
        a, b = _at(sim["samples"], t), _at(pure_doubling["samples"], t)
        diffs.append(max(abs(a["limit"][x] / b["limit"][x] - 1) for x in BUDGETS))
    print(f"limits vs the pure policy on smooth traffic (a request every second): max difference "
          f"{max(diffs) * 100:.2f}% at the marks; pure policy refused {pure_doubling['refused']}")

    sat_md = markdown_table(pure_saturated["samples"], README_MARKS, traffic=False)
    dbl_md = markdown_table(pure_doubling["samples"], README_MARKS, traffic=True)
    print("\nREADME: limits of a caller that keeps its bucket saturated (small model, tier 1):\n")
    print(sat_md)
    print(f"\nREADME: limits for traffic that doubles every hour from {start:,.0f} prompt tokens/min "
          "(small model, tier 1):\n")
    print(dbl_md)
    sat_long = [[label] + [_k(_at(pure_saturated["samples"], t)["limit"][b]) for b in BUDGETS]
                for t, label in marks]
    print("\nsaturated caller, pure policy, all marks:")
    C.print_table(["time", "limit prompt", "limit uncached", "limit generated"], sat_long)

    return {
        "goal_429": GOAL_RAMP_429,
        "pass": sim["refused"] <= GOAL_RAMP_429,
        "refused": sim["refused"],
        "refused_by": sim["refused_by"],
        "requests": sim["requests"],
        "start_prompt_per_min": start,
        "hours": hours,
        "in_process": {**sim, "samples": [s for s in sim["samples"] if any(abs(s["t_s"] - t) < 1e-6 for t, _ in marks)]},
        "in_process_every_10_min": [s for s in sim["samples"] if int(s["t_s"]) % 600 == 0],
        "max_limit_diff_vs_policy": max(diffs),
        "pure_doubling_refused": pure_doubling["refused"],
        "readme_saturated_md": sat_md,
        "readme_doubling_md": dbl_md,
        "saturated": [_at(pure_saturated["samples"], t) | {"label": label} for t, label in marks],
        "doubling_policy": [_at(pure_doubling["samples"], t) | {"label": label} for t, label in marks],
        "wall_s": round(sim_wall, 1),
    }


# =================================================================================================
# Apps
# =================================================================================================

def _budgets(prompt: int, uncached: int, generated: int) -> dict:
    b = {"prompt": prompt, "uncached": uncached, "generated": generated}
    return {"floor": b, "ceiling": b}


def _pool(model_id: str, limits: dict, args) -> dict:
    return {
        "id": model_id,
        "context_length": 2048,
        "num_replicas": 1,
        "resources": {"num_cpus": 0.1},
        "max_ongoing_requests": 256,
        # Zero latency: a scheduler step only yields to the event loop.
        "engine": {"kind": "sim", "block_size": 32, "max_num_seqs": 256, "cache_capacity_tokens": 1 << 16,
                   "latency": {}},
        "limits": limits,
    }


def accuracy_config(args) -> dict:
    big = args.other_budgets_tpm
    return {
        "models": [_pool(ACC_MODEL, _budgets(args.limit_tpm, big, big), args)],
        "ingress": {"num_replicas": args.replicas, "num_cpus": 0.1, "max_ongoing_requests": 512,
                    "max_completion_tokens": 256, "access_log": False},
        "store": {"url": args.redis_url},
        # Defaults otherwise: lease_fraction 0.02, lease_idle_s 1, requests_per_minute 6000.
        "rate_limit": {"enabled": True},
    }


def cost_config(args, enabled: bool) -> dict:
    """Limits far above what this box can send, so admission never refuses and only its cost shows."""
    tpm = args.cost_limit_tpm
    return {
        "models": [_pool(COST_MODEL, _budgets(tpm, tpm, tpm), args)],
        "ingress": {"num_replicas": 1, "num_cpus": 0.1, "max_ongoing_requests": 512,
                    "max_completion_tokens": 256, "access_log": False},
        "store": {"url": args.redis_url},
        "rate_limit": {"enabled": enabled, "requests_per_minute": args.cost_limit_rpm},
    }


def flush_redis(url: str) -> int:
    import redis

    r = redis.Redis.from_url(url)
    n = 0
    for k in r.scan_iter("ember:rl:*"):
        n += r.delete(k)
    r.close()
    return n


def deploy(apps: dict[str, dict]) -> None:
    """Start every app at once (replicas start in parallel); each at route /<name>."""
    from ray import serve
    from ray.serve.api import RunTarget

    from cluster.builder import build_app

    os.environ["EMBER_DEMO_KEY"] = DEMO_KEY  # read by build_app; only its hash is kept
    serve.run_many([RunTarget(target=build_app(cfg), name=name, route_prefix=f"/{name}")
                    for name, cfg in apps.items()])


# =================================================================================================
# Accuracy: 64 bursty clients against 4 ingress replicas
# =================================================================================================

LIMIT_HEADERS = [f"x-ratelimit-{kind}-tokens-{name}" for name in ("prompt", "cache-adjusted-prompt", "generated")
                 for kind in ("limit", "remaining", "reset")]


def accuracy_bodies(n: int = 40, seed: int = 0) -> list[tuple[bytes, int]]:
    """Chat requests of varied length (about 30 to 350 prompt tokens), with their prompt token counts."""
    from cluster.config import demo_model_dir
    from deployments.openai_api import ChatCompletionRequest
    from deployments.prompts import PromptBuilder

    rng = random.Random(seed)
    builder = PromptBuilder(demo_model_dir())
    out = []
    for i in range(n):
        k = rng.randint(1, 30)
        body = {"model": ACC_MODEL, "max_tokens": 8,
                "messages": [{"role": "user", "content": f"Request kind {i}: tell me about rate limits. "
                              + "lorem ipsum dolor sit amet " * k}]}
        n_prompt = len(builder.chat(ChatCompletionRequest.model_validate(body).messages))
        out.append((json.dumps(body).encode(), n_prompt))
    return out


async def run_accuracy(args, base: str) -> dict:
    import httpx

    url = f"{base}/rl-accuracy/v1/chat/completions"
    headers = {"authorization": f"Bearer {DEMO_KEY}", "content-type": "application/json"}
    bodies = accuracy_bodies(seed=args.seed)
    # One tuple per response: (t_done, status, prompt, cached, completion, latency, headers_ok, param,
    # created); times in seconds from the start of the run, on the client's clock.
    records: list[tuple] = []
    perf = time.perf_counter
    limits = httpx.Limits(max_connections=args.clients + 16, max_keepalive_connections=args.clients + 16)
    cpu = C.ProcessCpu()
    cpu0 = cpu.snapshot()
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0), trust_env=False) as http:
        t0, t0_wall = perf(), time.time()
        # Windows are counted by the server's `created` (whole epoch seconds, stamped just before
        # admission), so each starts on a whole second: the run is stretched by < 1 s to end on one.
        first_window = math.ceil(t0_wall + args.window_start)
        n_windows = int((args.duration - args.window_start + 1e-9) // 60)
        dur = first_window + 60 * n_windows - t0_wall if n_windows else args.duration
        deadline = t0 + dur

        async def client(i: int) -> None:
            rng = random.Random(args.seed * 1000 + i)
            await asyncio.sleep(rng.uniform(0, args.pause_max))  # clients start spread out
            while perf() < deadline:
                for _ in range(rng.randint(1, args.burst_max)):  # a burst, back to back
                    if perf() >= deadline:
                        return
                    body, n_prompt = rng.choice(bodies)
                    ts = perf()
                    try:
                        r = await http.post(url, content=body, headers=headers)
                    except Exception as exc:
                        records.append((perf() - t0, f"exc:{type(exc).__name__}", n_prompt, 0, 0, perf() - ts,
                                        False, None, None))
                        continue
                    td = perf()
                    h = r.headers
                    ok = all(k in h for k in LIMIT_HEADERS)
                    param = created = None
                    p = cached = gen = 0
                    if r.status_code == 200:
                        d = r.json()
                        u, created = d["usage"], d["created"]
                        p, gen = u["prompt_tokens"], u["completion_tokens"]
                        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                    elif r.status_code == 429:
                        ra = h.get("retry-after", "")
                        ok = ok and ra.isdigit() and int(ra) >= 1
                        try:
                            param = r.json()["error"].get("param")
                        except Exception:
                            param = "?"
                        p = n_prompt
                    records.append((td - t0, r.status_code, p, cached, gen, td - ts, ok, param, created))
                await asyncio.sleep(rng.uniform(args.pause_min, args.pause_max))

        await asyncio.gather(*(client(i) for i in range(args.clients)))
        wall = perf() - t0
    cpu.refresh()  # the limiter actor started during the run; its CPU time is all in the run
    used = C.ProcessCpu.delta(cpu0, cpu.snapshot())
    cpu_util = {k: round(v / wall, 3) for k, v in sorted(used.items()) if v / wall >= 0.005}

    limit = args.limit_tpm
    ok200 = [r for r in records if r[1] == 200]
    r429 = [r for r in records if r[1] == 429]
    statuses = Counter(str(r[1]) for r in records)
    off = first_window - t0_wall  # window start in seconds from the start of the run

    def window(start_wall: int, by_client_clock: bool = False) -> dict:
        if by_client_clock:  # the client's completion time instead (blurred by latency)
            a = start_wall - t0_wall
            sel = [r for r in ok200 if a <= r[0] < a + 60]
        else:
            sel = [r for r in ok200 if start_wall <= r[8] < start_wall + 60]
        prompt = sum(r[2] for r in sel)
        return {"from_s": round(start_wall - t0_wall, 2), "to_s": round(start_wall + 60 - t0_wall, 2),
                "requests": len(sel), "prompt_tokens": prompt, "uncached_tokens": sum(r[2] - r[3] for r in sel),
                "generated_tokens": sum(r[4] for r in sel), "error_pct": (prompt / limit - 1) * 100}

    windows = [window(first_window + 60 * k) for k in range(n_windows)]
    windows_client = [window(first_window + 60 * k, True) for k in range(n_windows)]
    # The same over 60 s windows sliding by 10 s (informational: shows how steady it is).
    sliding = [(w["from_s"], w["error_pct"]) for w in
               (window(first_window + 10 * k) for k in range(6 * (n_windows - 1) + 1))] if n_windows else []
    first_429 = min((r[0] for r in r429), default=None)
    offered = sum(r[2] for r in records if r[0] < dur) / (dur / 60.0)  # prompt tokens of every request
    lat200 = C.latency_summary_ms([r[5] for r in ok200])
    lat429 = C.latency_summary_ms([r[5] for r in r429])
    missing_429 = sum(1 for r in r429 if not r[6])
    missing_200 = sum(1 for r in ok200 if not r[6])
    worst = max((abs(w["error_pct"]) for w in windows), default=float("nan"))
    return {
        "limit_prompt_per_min": limit,
        "other_budgets_per_min": args.other_budgets_tpm,
        "replicas": args.replicas,
        "clients": args.clients,
        "duration_s": round(dur, 2),
        "first_window_starts_s": round(off, 2),
        "wall_s": round(wall, 1),
        "windows": windows,
        "windows_by_client_completion_time": windows_client,
        "sliding_windows_error_pct": sliding,
        "cpu_cores_by_role": cpu_util,
        "first_429_s": first_429,
        "offered_prompt_per_min": offered,
        "statuses": dict(statuses),
        "requests": len(records),
        "refused_by": dict(Counter(r[7] for r in r429)),
        "429_without_required_headers": missing_429,
        "200_without_ratelimit_headers": missing_200,
        "latency_ms_200": lat200,
        "latency_ms_429": lat429,
        "worst_window_error_pct": worst,
        "pass": bool(windows) and worst <= GOAL_ACCURACY_PCT,
        "headers_pass": missing_429 == 0 and len(r429) > 0,
    }


def print_accuracy(acc: dict) -> None:
    print(f"\n== accuracy: {acc['replicas']} ingress replicas, {acc['clients']} bursty clients, fixed limit "
          f"{acc['limit_prompt_per_min']:,} prompt tokens/min (uncached, generated: {acc['other_budgets_per_min']:,}), "
          f"Redis store, {acc['duration_s']:g} s")
    rows = [[f"{w['from_s']:.0f}-{w['to_s']:.0f} s", w["requests"], w["prompt_tokens"], w["uncached_tokens"],
             w["generated_tokens"], f"{w['error_pct']:+.2f}%"] for w in acc["windows"]]
    for w in acc["windows_by_client_completion_time"]:
        rows.append([f"(client clock) {w['from_s']:.0f}-{w['to_s']:.0f} s", w["requests"], w["prompt_tokens"],
                     w["uncached_tokens"], w["generated_tokens"], f"{w['error_pct']:+.2f}%"])
    sl = [e for _, e in acc["sliding_windows_error_pct"]]
    if len(sl) > len(acc["windows"]):
        rows.append([f"{len(sl)} windows sliding by 10 s", "", "", "", "", f"{min(sl):+.2f}%..{max(sl):+.2f}%"])
    print("(windows by the server's `created` second of each 200 response, taken just before admission;"
          " '(client clock)': by the time the response arrived)")
    C.print_table(["window", "200s", "prompt tokens", "uncached", "generated", "vs limit"], rows)
    st = acc["statuses"]
    other = {k: v for k, v in st.items() if k not in ("200", "429")}
    print(f"responses: 200 {st.get('200', 0):,}  429 {st.get('429', 0):,}  other {sum(other.values())} {other or ''}"
          f"  | 429 by budget {acc['refused_by']}  | offered {acc['offered_prompt_per_min']:,.0f} prompt tokens/min"
          f"  | first 429 at {acc['first_429_s'] or float('nan'):.1f} s")
    print(f"429s missing Retry-After or X-Ratelimit-*: {acc['429_without_required_headers']}   "
          f"200s missing X-Ratelimit-*: {acc['200_without_ratelimit_headers']}")
    l2, l4 = acc["latency_ms_200"], acc["latency_ms_429"]
    print(f"latency 200: p50 {l2.get('p50', float('nan')):.1f} ms p99 {l2.get('p99', float('nan')):.1f} ms   "
          f"429: p50 {l4.get('p50', float('nan')):.1f} ms p99 {l4.get('p99', float('nan')):.1f} ms")
    print(f"CPU (cores) by process role during the run: {acc['cpu_cores_by_role']}")


# =================================================================================================
# Cost: with and without the limiter, interleaved
# =================================================================================================

COST_PROMPT = "Say hello to the rate limit benchmark in a few words."


def cost_senders(base: str, max_tokens: int) -> dict:
    body = json.dumps({"model": COST_MODEL, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": COST_PROMPT}]}).encode()
    headers = {"authorization": f"Bearer {DEMO_KEY}", "content-type": "application/json"}

    def sender(name: str, expect_headers: bool):
        url = f"{base}/{name}/v1/chat/completions"

        async def send(client):
            status, data, _ = await client.post(url, body, headers)
            if status != 200:
                raise C.CheckFailed(f"HTTP {status}: {data[:200]!r}")
            u = json.loads(data).get("usage") or {}
            if u.get("completion_tokens") != max_tokens:
                raise C.CheckFailed(f"bad usage {u!r}")
            return None

        return send

    return {"rl-on": sender("rl-on", True), "rl-off": sender("rl-off", False)}


async def run_cost(args, base: str) -> dict:
    senders = cost_senders(base, args.cost_max_tokens)
    variants = ["rl-on", "rl-off"]
    # One raw check that the limited app admits through the limiter (headers present) and the other not.
    async with C.HttpxClient(max_connections=max(args.cost_concurrency) + 8) as client:
        import httpx

        async with httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(120.0)) as h:
            hdr = {"authorization": f"Bearer {DEMO_KEY}", "content-type": "application/json"}
            body = json.dumps({"model": COST_MODEL, "max_tokens": 1,
                               "messages": [{"role": "user", "content": COST_PROMPT}]})
            on = await h.post(f"{base}/rl-on/v1/chat/completions", content=body, headers=hdr)
            off = await h.post(f"{base}/rl-off/v1/chat/completions", content=body, headers=hdr)
            limited = "x-ratelimit-limit-tokens-prompt" in on.headers
            unlimited = "x-ratelimit-limit-tokens-prompt" not in off.headers
        for v in variants + variants[::-1]:  # warm-up, both alike
            await C.closed_loop(client, senders[v], max(args.cost_concurrency), args.cost_warmup / 4)
        cpu = C.ProcessCpu()  # after the warm-up: the limiter actor exists by now
        rounds = []
        for r in range(args.cost_rounds):
            for conc in args.cost_concurrency:
                for v in (variants if r % 2 == 0 else variants[::-1]):
                    before = cpu.snapshot()
                    res = await C.closed_loop(client, senders[v], conc, args.cost_duration)
                    used = C.ProcessCpu.delta(before, cpu.snapshot())
                    lat = C.latency_summary_ms(res.latencies_s)
                    rounds.append({"round": r, "concurrency": conc, "variant": v, "requests": res.requests,
                                   "errors": res.errors, "error_samples": res.error_samples,
                                   "rps": round(res.rps, 1), "p50_ms": lat.get("p50"), "p99_ms": lat.get("p99"),
                                   "cpu_s": {"ingress": used.get(f"{v}.ingress", 0.0),
                                             "limiter_actor": used.get("actor.RateLimiter", 0.0),
                                             "proxy": used.get("serve.proxy", 0.0),
                                             "client": used.get("client(driver)", 0.0)},
                                   "_lat": res.latencies_s})
                    print(f"  C={conc} round {r} {v:6s} {res.rps:7.1f} req/s  p50 {lat.get('p50', float('nan')):6.2f} ms"
                          f"  p99 {lat.get('p99', float('nan')):6.2f} ms  errors {res.errors}", flush=True)
    levels = []
    for conc in args.cost_concurrency:
        agg = {}
        for v in variants:
            rs = [x for x in rounds if x["concurrency"] == conc and x["variant"] == v]
            lats = [t for x in rs for t in x["_lat"]]
            n = max(sum(x["requests"] + x["errors"] for x in rs), 1)
            agg[v] = {**C.latency_summary_ms(lats), "errors": sum(x["errors"] for x in rs),
                      "rps": round(statistics.fmean(x["rps"] for x in rs), 1),
                      "cpu_ms_per_request": {k: sum(x["cpu_s"][k] for x in rs) / n * 1e3
                                             for k in ("ingress", "limiter_actor", "proxy", "client")}}
        per_round = []
        for r in range(args.cost_rounds):
            a = [x for x in rounds if x["concurrency"] == conc and x["round"] == r]
            d = {x["variant"]: x for x in a}
            if "rl-on" in d and "rl-off" in d and d["rl-on"]["p50_ms"] is not None and d["rl-off"]["p50_ms"] is not None:
                per_round.append(d["rl-on"]["p50_ms"] - d["rl-off"]["p50_ms"])
        added_p50 = agg["rl-on"]["p50"] - agg["rl-off"]["p50"]
        levels.append({
            "concurrency": conc,
            "with_limiter": agg["rl-on"],
            "without_limiter": agg["rl-off"],
            "added_p50_ms": added_p50,
            "added_p99_ms": agg["rl-on"]["p99"] - agg["rl-off"]["p99"],
            "added_p50_ms_per_round": per_round,
            "added_p50_ms_median_round": statistics.median(per_round) if per_round else None,
            # Noise-robust companion: CPU the limiter adds per request (ingress + limiter actor).
            "added_cpu_ms_per_request": (agg["rl-on"]["cpu_ms_per_request"]["ingress"]
                                         + agg["rl-on"]["cpu_ms_per_request"]["limiter_actor"]
                                         - agg["rl-off"]["cpu_ms_per_request"]["ingress"]),
            "pass": added_p50 <= GOAL_ADDED_P50_MS,
        })
    for x in rounds:
        x.pop("_lat", None)
    return {"levels": levels, "rounds": rounds, "limited_app_sends_headers": limited,
            "unlimited_app_sends_none": unlimited, "duration_s": args.cost_duration, "rounds_n": args.cost_rounds}


def admission_microbench(args, n: int = 20_000) -> dict:
    """The admission path alone, in this process: ``LimiterClient.admit`` + ``rate_limit_headers`` +
    ``settle`` per request against the real ``RateLimiter`` (Redis store, as in the apps), with the
    cost app's limits and a real clock. Noise-robust companion of the HTTP comparison: it is the
    CPU the limiter puts on a request's path, leases included (about 1 in 0.02 x limit / cost)."""
    import uuid

    from cluster.stores import RedisLimitStore
    from deployments.rate_limiter import rate_limit_headers

    config = RateLimitConfig(requests_per_minute=args.cost_limit_rpm)
    model = ModelConfig.model_validate(_pool(COST_MODEL, _budgets(*(args.cost_limit_tpm,) * 3), args))

    async def go() -> dict:
        limiter = RateLimiter(config, args.redis_url, store=RedisLimitStore(args.redis_url))
        handle = InProcessActor(limiter)
        client = LimiterClient(config, lambda shard: handle)
        account = "bench-micro-" + uuid.uuid4().hex[:8]
        cost = client.reservation(20, args.cost_max_tokens, 1)
        perf = time.perf_counter
        times, refused = [], 0
        for _ in range(n):
            t = perf()
            adm = await client.admit(account, model, 1, cost)
            rate_limit_headers(adm)
            client.settle(adm, 20, 0, args.cost_max_tokens)
            times.append(perf() - t)
            refused += not adm.allowed
        await client.close()
        return {"n": n, "refused": refused, **{k: v * 1e3 for k, v in C.latency_summary_ms(times).items()
                                                if k != "n"}}

    out = asyncio.run(go())
    return {"unit": "microseconds", **out}


def print_cost(cost: dict) -> None:
    print("\n== cost of admission: two apps (1 ingress replica each, same SimEngine pool config), "
          "rate_limit on vs off, non-streamed, interleaved rounds")
    rows = []
    for lv in cost["levels"]:
        on, off = lv["with_limiter"], lv["without_limiter"]
        rows.append([lv["concurrency"], on["n"], off["n"], on["rps"], off["rps"], on["p50"], off["p50"],
                     f"{lv['added_p50_ms']:+.3f}", on["p99"], off["p99"], f"{lv['added_p99_ms']:+.3f}",
                     f"{lv['added_p50_ms_median_round']:+.3f}", on["errors"] + off["errors"]])
    C.print_table(["C", "n on", "n off", "req/s on", "req/s off", "p50 on", "p50 off", "added p50 ms",
                   "p99 on", "p99 off", "added p99 ms", "median round added p50", "errors"], rows)
    rows = []
    for lv in cost["levels"]:
        on, off = lv["with_limiter"]["cpu_ms_per_request"], lv["without_limiter"]["cpu_ms_per_request"]
        rows.append([lv["concurrency"], on["ingress"], off["ingress"], on["limiter_actor"], on["proxy"], off["proxy"],
                     f"{lv['added_cpu_ms_per_request']:+.3f}"])
    C.print_table(["C", "ingress CPU ms/req on", "off", "limiter actor on", "proxy on", "proxy off",
                   "added CPU ms/req (ingress+actor)"], rows)
    for lv in cost["levels"]:
        print(f"  C={lv['concurrency']} added p50 per round (ms): "
              + ", ".join(f"{x:+.3f}" for x in lv["added_p50_ms_per_round"]))
    m = cost.get("in_process")
    if m:
        print(f"  admission path in-process (admit + headers + settle, Redis store, {m['n']:,} requests): "
              f"p50 {m['p50']:.1f} us  p99 {m['p99']:.1f} us  max {m['max'] / 1e3:.2f} ms  mean {m['mean']:.1f} us")
    print(f"  limited app sends X-Ratelimit-*: {cost['limited_app_sends_headers']}; "
          f"unlimited app sends none: {cost['unlimited_app_sends_none']}")


# =================================================================================================
# Main
# =================================================================================================

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--small", action="store_true",
                   help="quick mode: 70 s accuracy run (one 60 s window from 10 s), 2 cost rounds")
    p.add_argument("--parts", default="ramp,accuracy,cost", help="comma-separated subset of ramp,accuracy,cost")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    p.add_argument("--output", default="bench_results/rate_limit.json")
    p.add_argument("--seed", type=int, default=1)
    # accuracy
    p.add_argument("--limit-tpm", type=int, default=30_000, help="the fixed prompt-token limit per minute")
    p.add_argument("--other-budgets-tpm", type=int, default=10_000_000,
                   help="the fixed uncached and generated limits: far above use, so prompt binds")
    p.add_argument("--replicas", type=int, default=4, help="ingress replicas (and simulated clients in the ramp)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=None, help="accuracy run seconds (default 180; --small 70)")
    p.add_argument("--window-start", type=float, default=None,
                   help="first measured 60 s window starts here (default 60: the bucket starts full; --small 10, "
                        "checked against the time of the first 429)")
    p.add_argument("--burst-max", type=int, default=12, help="requests per burst: uniform 1..N")
    p.add_argument("--pause-min", type=float, default=0.2)
    p.add_argument("--pause-max", type=float, default=2.0)
    # ramp
    p.add_argument("--ramp-hours", type=float, default=6.0)
    p.add_argument("--ramp-start-fraction", type=float, default=0.5,
                   help="doubling traffic starts at this fraction of the prompt floor")
    # cost
    p.add_argument("--cost-rounds", type=int, default=None, help="default 8; --small 3")
    p.add_argument("--cost-duration", type=float, default=None, help="seconds per round (default 2.5; --small 2)")
    p.add_argument("--cost-concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--cost-warmup", type=float, default=4.0)
    p.add_argument("--cost-max-tokens", type=int, default=8)
    p.add_argument("--cost-limit-tpm", type=int, default=20_000_000)
    p.add_argument("--cost-limit-rpm", type=int, default=100_000)
    a = p.parse_args(argv)
    a.duration = a.duration or (70.0 if a.small else 180.0)
    a.window_start = a.window_start if a.window_start is not None else (10.0 if a.small else 60.0)
    a.cost_rounds = a.cost_rounds or (3 if a.small else 8)
    a.cost_duration = a.cost_duration or (2.0 if a.small else 2.5)
    a.parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    machine_before = C.machine_info()
    out: dict = {"benchmark": "rate_limit", "mode": "small" if args.small else "full",
                 "settings": {k: v for k, v in vars(args).items()}}
    goals: list[tuple[str, bool, str]] = []

    if "ramp" in args.parts:
        ramp = run_ramp(args)
        out["ramp"] = ramp
        goals.append(("ramp: 429s for traffic doubling every hour", ramp["pass"],
                      f"{ramp['refused']} of {ramp['requests']:,} requests (goal {GOAL_RAMP_429})"))

    if "accuracy" in args.parts or "cost" in args.parts:
        base, _ = C.start_ray_serve(num_cpus=4)
        try:
            import ray

            out["gcs_address"] = ray.get_runtime_context().gcs_address
            print(f"\nRay GCS at {out['gcs_address']}; Serve at {base}; "
                  f"deleted {flush_redis(args.redis_url)} ember:rl:* keys in {args.redis_url}", flush=True)
            apps = {}
            if "accuracy" in args.parts:
                apps["rl-accuracy"] = accuracy_config(args)
            if "cost" in args.parts:
                apps["rl-on"] = cost_config(args, True)
                apps["rl-off"] = cost_config(args, False)
            deploy(apps)
            print(f"apps {', '.join(apps)} up after {time.perf_counter() - t_start:.0f} s", flush=True)
            if "accuracy" in args.parts:
                print(f"accuracy: {args.clients} clients for {args.duration:g} s", flush=True)
                acc = asyncio.run(run_accuracy(args, base))
                out["accuracy"] = {**acc, "config": accuracy_config(args)}
                print_accuracy(acc)
                windows = ", ".join(f"{w['error_pct']:+.2f}%" for w in acc["windows"])
                goals.append((f"accuracy: admitted prompt tokens per 60 s window within ±{GOAL_ACCURACY_PCT:g}%",
                              acc["pass"], f"windows {windows}"))
                goals.append(("accuracy: every 429 has Retry-After and X-Ratelimit-*", acc["headers_pass"],
                              f"{acc['429_without_required_headers']} of {acc['statuses'].get('429', 0)} missing"))
                if args.window_start < 60 and (acc["first_429_s"] is None or acc["first_429_s"] > args.window_start):
                    print(f"WARNING: the first 429 came at {acc['first_429_s']} s, after the window start "
                          f"{args.window_start:g} s: the initial bucket may not have been drained")
                from ray import serve

                serve.delete("rl-accuracy", _blocking=False)  # out of the way of the cost rounds
                # Its limiter actor is detached and would outlive the app: end it, so that the
                # cost rounds' CPU accounting sees only the limited cost app's actor.
                for a in ray.util.list_named_actors(all_namespaces=True):
                    if a["name"].startswith("ember-ratelimit-"):
                        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
            if "cost" in args.parts:
                cost = asyncio.run(run_cost(args, base))
                cost["in_process"] = admission_microbench(args)
                out["cost"] = {**cost, "config_on": cost_config(args, True)}
                print_cost(cost)
                for lv in cost["levels"]:
                    goals.append((f"cost: added p50 at C={lv['concurrency']} <= {GOAL_ADDED_P50_MS:g} ms", lv["pass"],
                                  f"{lv['added_p50_ms']:+.3f} ms (median of rounds "
                                  f"{lv['added_p50_ms_median_round']:+.3f}), p99 {lv['added_p99_ms']:+.3f} ms"))
        finally:
            C.stop_ray_serve(graceful=False)

    print()
    for name, ok, detail in goals:
        print(f"{'PASS' if ok else 'MISS'}  {name}: {detail}")
    out["goals"] = [{"goal": n, "pass": ok, "measured": d} for n, ok, d in goals]
    out["machine"] = {"before": machine_before, "after": C.machine_info()}
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    path = C.write_json(C.REPO_ROOT / args.output if not os.path.isabs(args.output) else args.output, out)
    print(f"\nwrote {path} ({out['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

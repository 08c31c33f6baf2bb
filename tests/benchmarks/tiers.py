"""Tiers under overload: Priority keeps its latency, Standard's excess is shed, nothing times out,
and the ledger matches what clients were told.

One SimEngine pool is driven at 2x its capacity with Poisson arrivals, Priority and Standard
mixed 1:4, and compared in the same run with Priority alone on the same pool, unloaded.

    python tests/benchmarks/tiers.py            # ~2.5 min
    python tests/benchmarks/tiers.py --small    # ~1 min

Goals: Priority p99 TTFT <= 1.5x its unloaded p99; Standard excess shed with 503; 0 timeouts;
ledger totals == the client-side sum of `usage`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks._common import (  # noqa: E402
    percentile,
    print_table,
    start_ray_serve,
    stop_ray_serve,
    write_json,
)

MODEL = "accounts/ember/models/tiers"
ADMIN = "bench-admin-token"
PRICES = {"standard": {"input": 0.2, "output": 0.4}, "priority": {"input": 0.3, "output": 0.6}}
MAX_TOKENS = 48
REPLICAS, SEQS = 2, 8
LATENCY = {"step_base_s": 0.02, "decode_s_per_seq": 0.001, "prefill_base_s": 0.002,
           "prefill_s_per_token": 0.00001}


def config(priority_reserve: float) -> dict:
    return {
        "models": [{
            "id": MODEL, "context_length": 1024, "num_replicas": REPLICAS, "resources": {"num_cpus": 0.1},
            "pricing": PRICES,
            "engine": {"kind": "sim", "block_size": 32, "max_num_seqs": SEQS, "latency": LATENCY},
        }],
        "ingress": {"num_cpus": 0.2, "access_log": False, "max_queue_wait_s": 0.5, "priority_headroom": 4,
                    "priority_reserve": priority_reserve},
        "rate_limit": {"enabled": False},
    }


def service_time_s() -> float:
    # One request alone: prefill then MAX_TOKENS steps; under load each step also pays per sequence.
    return MAX_TOKENS * (LATENCY["step_base_s"] + LATENCY["decode_s_per_seq"] * SEQS / 2)


async def open_loop(http, base: str, key: str, rate: float, duration_s: float, priority_share: float,
                    seed: int) -> list[dict]:
    rng = random.Random(seed)
    results: list[dict] = []
    tasks = []

    async def one(i: int, tier: str) -> None:
        body = {"model": MODEL, "max_tokens": MAX_TOKENS, "seed": i,
                "messages": [{"role": "user", "content": f"Request {i}: summarise the tier rules."}]}
        if tier == "priority":
            body["service_tier"] = "priority"
        t0 = time.perf_counter()
        rec = {"tier": tier, "status": None}
        try:
            r = await http.post(base + "/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {key}"})
            rec["status"] = r.status_code
            if r.status_code == 200:
                j = r.json()
                rec["usage"] = j["usage"]
                rec["ttft_s"] = float(r.headers["fireworks-server-time-to-first-token"])
                rec["echo"] = j.get("service_tier")
            else:
                rec["code"] = r.json()["error"]["code"]
        except Exception as exc:  # timeouts and connection errors are what this run must not see
            rec["status"] = type(exc).__name__
        rec["latency_s"] = time.perf_counter() - t0
        results.append(rec)

    start = time.perf_counter()
    i = 0
    while (now := time.perf_counter() - start) < duration_s:
        tier = "priority" if rng.random() < priority_share else "standard"
        tasks.append(asyncio.create_task(one(i, tier)))
        i += 1
        await asyncio.sleep(max(0.0, rng.expovariate(rate) - (time.perf_counter() - start - now)))
    await asyncio.gather(*tasks)
    return results


def summarize(name: str, results: list[dict]) -> dict:
    out: dict = {"phase": name}
    for tier in ("priority", "standard"):
        rs = [r for r in results if r["tier"] == tier]
        ok = sorted(r["ttft_s"] for r in rs if r["status"] == 200)
        out[tier] = {
            "sent": len(rs),
            "ok": len(ok),
            "shed_503": sum(1 for r in rs if r["status"] == 503),
            "other": sum(1 for r in rs if r["status"] not in (200, 503)),
            "ttft_p50_ms": percentile(ok, 50) * 1000 if ok else None,
            "ttft_p99_ms": percentile(ok, 99) * 1000 if ok else None,
            "max_latency_s": max((r["latency_s"] for r in rs), default=0.0),
        }
    out["timeouts"] = sum(1 for r in results if "Timeout" in str(r["status"]))
    return out


async def run(args) -> dict:
    import httpx
    from ray import serve

    from cluster.builder import build_app

    os.environ["EMBER_ADMIN_TOKEN"] = ADMIN
    base, _ = start_ray_serve()
    try:
        serve.run(build_app(config(args.priority_reserve)), name="tiers", route_prefix="/")
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
        async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as http:
            h = {"Authorization": f"Bearer {ADMIN}"}
            await http.post(base + "/admin/accounts", json={"id": "bench"}, headers=h)
            key = (await http.post(base + "/admin/accounts/bench/keys", headers=h)).json()["key"]
            capacity = REPLICAS * SEQS / service_time_s()  # requests per second the pool can finish
            # Warm up, then Priority alone at a tenth of capacity: the unloaded reference.
            warm = await open_loop(http, base, key, capacity / 10, 3, 1.0, seed=1)
            unloaded = await open_loop(http, base, key, capacity / 10, args.unloaded_s, 1.0, seed=2)
            loaded = await open_loop(http, base, key, 2 * capacity, args.loaded_s, 0.2, seed=3)
            await asyncio.sleep(1.0)
            usage = (await http.get(base + "/v1/usage", headers={"Authorization": f"Bearer {key}"})).json()
    finally:
        stop_ray_serve()

    everything = warm + unloaded + loaded
    client = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0}
    for r in everything:
        if r["status"] == 200:
            client["requests"] += 1
            client["prompt_tokens"] += r["usage"]["prompt_tokens"]
            client["cached_tokens"] += r["usage"]["prompt_tokens_details"]["cached_tokens"]
            client["completion_tokens"] += r["usage"]["completion_tokens"]
    ledger = {k: sum(row[k] for row in usage["data"]) for k in client}
    return {"capacity_rps": capacity, "unloaded": summarize("unloaded", unloaded),
            "loaded": summarize("loaded", loaded), "client_usage": client, "ledger_usage": ledger,
            "echo_ok": all(r.get("echo") == "priority" for r in everything
                           if r["tier"] == "priority" and r["status"] == 200)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--loaded-s", type=float, default=90)
    ap.add_argument("--unloaded-s", type=float, default=40)
    ap.add_argument("--timeout", type=float, default=60, help="client timeout: any hit counts as a timeout")
    ap.add_argument("--priority-reserve", type=float, default=0.6,
                    help="ingress.priority_reserve: the share of slots Standard may not use. Priority is "
                         "0.4x capacity here, so it needs about that share and some room for its bursts")
    ap.add_argument("--out", default="bench_results/tiers.json")
    args = ap.parse_args()
    if args.small:
        args.loaded_s, args.unloaded_s = 30, 20
    res = asyncio.run(run(args))

    rows = []
    for phase in ("unloaded", "loaded"):
        for tier in ("priority", "standard"):
            t = res[phase][tier]
            if t["sent"]:
                rows.append([phase, tier, t["sent"], t["ok"], t["shed_503"], t["other"],
                             t["ttft_p50_ms"] or 0.0, t["ttft_p99_ms"] or 0.0, t["max_latency_s"]])
    print(f"\npool capacity ~{res['capacity_rps']:.1f} req/s; loaded phase offers 2x, Priority:Standard 1:4\n")
    print_table(["phase", "tier", "sent", "200", "503", "other", "TTFT p50 ms", "TTFT p99 ms", "max lat s"], rows)

    p99_ratio = res["loaded"]["priority"]["ttft_p99_ms"] / res["unloaded"]["priority"]["ttft_p99_ms"]
    std = res["loaded"]["standard"]
    goals = {
        "priority_p99_ratio": (p99_ratio, p99_ratio <= 1.5),
        "standard_excess_shed_503": (std["shed_503"], std["shed_503"] > 0 and std["other"] == 0),
        "timeouts": (res["loaded"]["timeouts"] + res["unloaded"]["timeouts"],
                     res["loaded"]["timeouts"] + res["unloaded"]["timeouts"] == 0),
        "ledger_equals_client_usage": (res["ledger_usage"] == res["client_usage"],
                                       res["ledger_usage"] == res["client_usage"]),
        "priority_echoed": (res["echo_ok"], res["echo_ok"]),
    }
    print()
    print_table(["goal", "value", "result"],
                [[k, f"{v:.2f}" if isinstance(v, float) else str(v), "PASS" if ok else "MISS"]
                 for k, (v, ok) in goals.items()])
    print(f"\nclient usage {res['client_usage']}\nledger usage {res['ledger_usage']}")
    res["goals"] = {k: {"value": v, "pass": ok} for k, (v, ok) in goals.items()}
    res["priority_reserve"] = args.priority_reserve
    print("wrote", write_json(args.out, res))


if __name__ == "__main__":
    main()

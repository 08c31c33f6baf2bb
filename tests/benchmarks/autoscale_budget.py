"""Autoscaling goals the step benchmark does not cover: two models on one replica budget, and a
long steady load.

``budget``: models A and B (SimEngine, 1..6 replicas each; A 4 sequences a replica, B 16) under
the application-level policy (``EmberAppPolicy``) with ``max_total_replicas`` 6, deployed as
``serve deploy`` does. B gets 2 requests/s throughout, from its own account (about 14% of its
sequences busy, so its TTFT is not its own queueing). A gets 0.5x one replica's capacity for
``--quiet-s`` (B's unloaded reference), then surges to ``--surge`` x one replica for
``--surge-s``. Goals: A scales to the budget less B's minimum (5); B keeps its replica and its
p99 TTFT in the surge stays within 1.5x of its own in the quiet phase. Also reported: A's
refusals and wait, and how long A's requests waited once the budget was spent (the gate cannot
see the budget; a pool below its ``max_replicas`` expects replicas for ``replica_start_s``).

``steady``: one model (1..4 replicas) at ``--steady-load`` x one replica's capacity for
``--steady-s`` (10 minutes by default), Poisson arrivals. Goal: at most one scale reversal (a
rise after a fall, or a fall after a rise) over the whole run, its first rise included.

    python tests/benchmarks/autoscale_budget.py                    # both, ~13 min
    python tests/benchmarks/autoscale_budget.py --only budget      # ~2 min
    python tests/benchmarks/autoscale_budget.py --only steady --steady-s 120
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks._common import (  # noqa: E402
    latency_summary_ms, percentile, print_table, start_ray_serve, stop_ray_serve, write_json)
from tests.benchmarks.autoscale import (  # noqa: E402
    LATENCY, SEQS, deploy_with_app_policy, open_loop, replica_capacity_rps, reversals, watch_replicas)

MODEL_A = "accounts/ember/models/budget-a"
MODEL_B = "accounts/ember/models/budget-b"
POOLS = {MODEL_A: "pool-ember-models-budget-a", MODEL_B: "pool-ember-models-budget-b"}
STEADY_MODEL = "accounts/ember/models/steady"
STEADY_POOLS = {STEADY_MODEL: "pool-ember-models-steady"}
BUDGET = 6
B_SEQS = 16
B_RPS = 2.0
ADMIN = "bench-admin-token"


def _model(model_id: str, max_replicas: int, downscale_delay_s: float, seqs: int = SEQS) -> dict:
    return {"id": model_id, "context_length": 1024, "resources": {"num_cpus": 0.1},
            "autoscaling": {"min_replicas": 1, "max_replicas": max_replicas, "policy": "ember",
                            "downscale_delay_s": downscale_delay_s, "replica_start_s": 30},
            "engine": {"kind": "sim", "block_size": 32, "max_num_seqs": seqs, "latency": LATENCY}}


def config(models: list[dict]) -> dict:
    return {"models": models,
            "ingress": {"num_cpus": 0.2, "access_log": False, "max_queue_wait_s": 2.0,
                        "max_concurrent_per_account": 4096},
            "rate_limit": {"enabled": False}}


def _ttfts(results: list[dict], phase: str) -> list[float]:
    return [r["ttft_s"] for r in results if r["phase"] == phase and r["status"] == 200 and r.get("ttft_s") is not None]


@contextlib.asynccontextmanager
async def watched(app: str, pools: dict[str, str]):
    """Replicas and gates of ``app`` watched while the block runs (``watch_replicas``); the app is
    deleted after. Yields (t0, replica timeline, gate timeline)."""
    from ray import serve

    t0 = time.perf_counter()
    stop = asyncio.Event()
    timeline: list = []
    gates: list = []
    watcher = asyncio.create_task(watch_replicas(app, t0, stop, timeline, gates, pools))
    try:
        yield t0, timeline, gates
    finally:
        stop.set()
        await watcher
        serve.delete(app)


async def run_budget(http, base: str, key: str, args) -> dict:
    app = "autoscale-budget"
    # B runs 16 sequences a replica at B_RPS, about 14% of them busy: its TTFT is not its own
    # queueing (which would swamp a p99 over a minute's requests) but what A's surge does to it.
    deploy_with_app_policy(app, config([_model(MODEL_A, BUDGET, 30), _model(MODEL_B, BUDGET, 30, B_SEQS)]),
                           max_total_replicas=BUDGET)
    url = f"{base}/{app}/v1/chat/completions"
    cap = replica_capacity_rps()
    # B's traffic comes from its own account: one key's surge must not spend another's caps.
    admin = {"Authorization": f"Bearer {ADMIN}"}
    await http.post(f"{base}/{app}/admin/accounts", json={"id": "budget-b"}, headers=admin)
    b_key = (await http.post(f"{base}/{app}/admin/accounts/budget-b/keys", headers=admin)).json()["key"]
    # Warm both pools (first requests of a new app are slow), then measure.
    await asyncio.gather(open_loop(http, url, key, 0.5 * cap, 5, 1, time.perf_counter(), "warm", model=MODEL_A),
                         open_loop(http, url, b_key, B_RPS, 5, 2, time.perf_counter(), "warm", model=MODEL_B))
    async with watched(app, POOLS) as (t0, timeline, gates):
        async def b_load() -> list[dict]:
            quiet = await open_loop(http, url, b_key, B_RPS, args.quiet_s, 11, t0, "quiet", model=MODEL_B)
            return quiet + await open_loop(http, url, b_key, B_RPS, args.surge_s, 12, t0, "surge", model=MODEL_B)

        async def a_load() -> list[dict]:
            quiet = await open_loop(http, url, key, 0.5 * cap, args.quiet_s, 21, t0, "quiet", model=MODEL_A)
            return quiet + await open_loop(http, url, key, args.surge * cap, args.surge_s, 22, t0, "surge",
                                           model=MODEL_A)

        b, a = await asyncio.gather(b_load(), a_load())
    surge_start = args.quiet_s
    a_reps = [(t, n) for t, m, n in timeline if m == MODEL_A]
    b_reps = [(t, n) for t, m, n in timeline if m == MODEL_B]
    a_max = max((n for _, n in a_reps), default=0)
    reach = next((t - surge_start for t, n in a_reps if t >= surge_start and n >= BUDGET - 1), None)
    b_quiet, b_surge = _ttfts(b, "quiet"), _ttfts(b, "surge")
    b_ttft = {"quiet": latency_summary_ms(b_quiet), "surge": latency_summary_ms(b_surge)}
    p99_quiet, p99_surge = b_ttft["quiet"].get("p99"), b_ttft["surge"].get("p99")
    a_surge = [r for r in a if r["phase"] == "surge"]
    a_ok = [r for r in a_surge if r["status"] == 200]
    a_latency = sorted(r["done_at"] - r["sent_at"] for r in a_ok)

    def statuses(rs: list[dict]) -> dict[str, int]:
        return {str(k): sum(1 for r in rs if r["status"] == k) for k in {r["status"] for r in rs}}

    return {
        "scenario": "budget", "budget": BUDGET, "surge_x": args.surge,
        "a_max_replicas": a_max, "a_goal_replicas": BUDGET - 1, "a_time_to_goal_s": reach,
        "b_min_replicas_in_surge": min((n for t, n in b_reps if t >= surge_start), default=None),
        "b_ttft_p99_quiet_ms": p99_quiet, "b_ttft_p99_surge_ms": p99_surge,
        "b_ttft_p99_ratio": None if not (p99_quiet and p99_surge) else p99_surge / p99_quiet,
        "b_ttft_ms": b_ttft,
        "b_statuses": statuses(b), "a_surge_statuses": statuses(a_surge),
        "a_surge_refused_share": sum(1 for r in a_surge if r["status"] == 503) / max(1, len(a_surge)),
        "a_surge_latency_p50_s": percentile(a_latency, 50) if a_latency else None,
        "a_surge_latency_p99_s": percentile(a_latency, 99) if a_latency else None,
        "a_surge_served_per_s": len(a_ok) / args.surge_s,  # of those sent in the surge, however late
        "timeline": timeline, "gates": gates,
    }


async def run_steady(http, base: str, key: str, args) -> dict:
    app = "autoscale-steady"
    deploy_with_app_policy(app, config([_model(STEADY_MODEL, 4, 30)]))
    url = f"{base}/{app}/v1/chat/completions"
    async with watched(app, STEADY_POOLS) as (t0, timeline, _):
        rs = await open_loop(http, url, key, args.steady_load * replica_capacity_rps(), args.steady_s, 31, t0,
                             "steady", model=STEADY_MODEL)
    reps = [(t, n) for t, _, n in timeline]
    changes = [(round(t, 1), n) for (t, n), (_, prev) in zip(reps[1:], reps) if n != prev]
    return {
        "scenario": "steady", "load_x": args.steady_load, "seconds": args.steady_s, "sent": len(rs),
        "statuses": {str(k): sum(1 for r in rs if r["status"] == k) for k in {r["status"] for r in rs}},
        "reversals": reversals(reps), "changes": changes,
        "replicas_at_end": reps[-1][1] if reps else None, "timeline": timeline,
    }


async def run(args) -> list[dict]:
    import httpx

    os.environ["EMBER_ADMIN_TOKEN"] = ADMIN
    base, _ = start_ray_serve()
    out = []
    try:
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
        async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as http:
            key = os.environ["EMBER_DEMO_KEY"]
            if "budget" in args.only:
                out.append(await run_budget(http, base, key, args))
            if "steady" in args.only:
                out.append(await run_steady(http, base, key, args))
    finally:
        stop_ray_serve()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=["budget", "steady"], default=["budget", "steady"])
    ap.add_argument("--quiet-s", type=float, default=30)
    ap.add_argument("--surge-s", type=float, default=60)
    ap.add_argument("--surge", type=float, default=6.0, help="A's surge, x one replica's capacity")
    ap.add_argument("--steady-s", type=float, default=600)
    ap.add_argument("--steady-load", type=float, default=2.5, help="x one replica's capacity")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--out", default="bench_results/autoscale_budget.json")
    args = ap.parse_args()
    os.environ.setdefault("EMBER_DEMO_KEY", "bench-demo-key-0001")
    results = asyncio.run(run(args))

    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    rows = []
    for r in results:
        if r["scenario"] == "budget":
            print(f"\nbudget {r['budget']} replicas; B at {B_RPS} req/s on {B_SEQS} sequences throughout, "
                  f"A at 0.5x one replica then {r['surge_x']}x\nB's TTFT ms: {r['b_ttft_ms']}\n")
            print_table(["A max replicas", "goal", "A to goal s", "B min replicas", "B p99 quiet ms",
                         "B p99 surge ms", "ratio", "B statuses", "A refused %", "A latency p50/p99 s", "A served/s"],
                        [[r["a_max_replicas"], r["a_goal_replicas"], f(r["a_time_to_goal_s"], "{:.1f}"),
                          r["b_min_replicas_in_surge"], f(r["b_ttft_p99_quiet_ms"], "{:.1f}"),
                          f(r["b_ttft_p99_surge_ms"], "{:.1f}"), f(r["b_ttft_p99_ratio"]), r["b_statuses"],
                          f(100 * r["a_surge_refused_share"], "{:.1f}"),
                          f"{f(r['a_surge_latency_p50_s'])}/{f(r['a_surge_latency_p99_s'])}",
                          f(r["a_surge_served_per_s"], "{:.1f}")]])
            rows += [["A scales to the budget less B's minimum", f"{r['a_max_replicas']} of {r['a_goal_replicas']}",
                      "PASS" if r["a_max_replicas"] == r["a_goal_replicas"] else "MISS"],
                     ["B keeps its minimum", r["b_min_replicas_in_surge"],
                      "PASS" if (r["b_min_replicas_in_surge"] or 0) >= 1 else "MISS"],
                     ["B p99 TTFT in the surge <= 1.5x quiet", f(r["b_ttft_p99_ratio"]),
                      "PASS" if r["b_ttft_p99_ratio"] is not None and r["b_ttft_p99_ratio"] <= 1.5 else "MISS"]]
        else:
            print(f"\nsteady {r['load_x']}x one replica for {r['seconds']:.0f} s: {r['sent']} requests {r['statuses']}")
            print(f"replica changes (s, replicas): {r['changes']}")
            rows.append([f"reversals in {r['seconds']:.0f} s of steady load <= 1", r["reversals"],
                         "PASS" if r["reversals"] <= 1 else "MISS"])
    print()
    print_table(["goal", "value", "result"], rows)
    write_json(args.out, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()

"""Fair share within a tier: the gate's Virtual Token Counter order against first come, first served.

Two apps run side by side in one Ray session, identical but for ``ingress.queue_order`` (``vtc``
and ``fcfs``): one SimEngine pool each, 2 replicas x 8 sequences, Standard tier only. Phases,
each driven over HTTP (httpx), one app at a time:

1. *Quiet alone* (on the vtc app): 4 quiet accounts, Poisson arrivals at ``--quiet-share`` (0.08)
   of the pool's nominal capacity each: their TTFT p99 alone is the reference.
2. *Noisy neighbour* (vtc, then fcfs): the same 4 quiet accounts plus one noisy account at 10x the
   traffic of each (0.8x nominal capacity, about all the pool really serves on a busy 2-core
   machine), so the pool is overloaded about 1.5x and each quiet account asks well under a fifth
   of it. Reported:
   the quiet accounts' TTFT p99 against alone, their 503s, and completed requests per second
   against FCFS.
3. *Two backlogged accounts* (vtc, then fcfs): A sends long prompts and short answers, B short
   prompts and long answers, each from more closed-loop clients than the pool has slots, so
   that both always have requests waiting at the gate (an account whose requests all run is not
   backlogged, and VTC rightly gives the other the freed slots).
   A request's weighted tokens (prompt + 2 x generated) count as served when a pool replica takes
   it (the start of its ``x-ember-replica-span``: just after the gate handed it a slot). Reported: the largest difference of the two
   accounts' service over any interval while both are backlogged (from 2 s after the start until
   the clients stop), max D - min D with D(t) = served_A(t) - served_B(t),
   against the VTC bound 2 x max(max prompt, 2 x max generated). Both apps are redeployed for
   this phase with a long queue bound (``--backlog-queue-wait-s``), so that no request is shed.

Goals: quiet p99 TTFT <= 1.5x alone (vtc); throughput >= 0.95x FCFS; backlogged difference
within the VTC bound (vtc).

    flock /tmp/ember-ray.lock python tests/benchmarks/fairness.py            # ~4 min
    flock /tmp/ember-ray.lock python tests/benchmarks/fairness.py --small    # ~2 min
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
from tests.benchmarks.tiers import ADMIN, LATENCY, MAX_TOKENS, REPLICAS, SEQS, service_time_s  # noqa: E402

MODEL = "accounts/ember/models/fair"  # the tiers benchmark's pool, without Priority
QUIET = [f"quiet{i}" for i in range(4)]
ORDERS = ("vtc", "fcfs")
# Backlogged pair: (prompt words, max_tokens). A: long prompt, short answer; B: the reverse.
SHAPES = {"heavy-in": (150, 8), "heavy-out": (10, 64)}


def config(order: str, max_queue_wait_s: float | None = None, headroom: float | None = None) -> dict:
    ingress: dict = {"num_cpus": 0.2, "access_log": False, "queue_order": order}
    if max_queue_wait_s is not None:
        ingress["max_queue_wait_s"] = max_queue_wait_s
    return {
        "models": [{
            "id": MODEL, "context_length": 1024, "num_replicas": REPLICAS, "resources": {"num_cpus": 0.1},
            "engine": {"kind": "sim", "block_size": 32, "max_num_seqs": SEQS, "latency": LATENCY,
                       **({} if headroom is None else {"fair_share_headroom": headroom})},
        }],
        "ingress": ingress,
        "rate_limit": {"enabled": False},
    }


async def one_request(http, url: str, key: str, account: str, words: int, max_tokens: int, i: int,
                      t0: float) -> dict:
    body = {"model": MODEL, "max_tokens": max_tokens, "seed": i,
            "messages": [{"role": "user", "content": f"Request {i}: " + "tokens " * words}]}
    rec: dict = {"account": account, "sent_at": time.perf_counter() - t0, "status": None}
    sent_wall = time.time()
    try:
        r = await http.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
        rec["status"] = r.status_code
        if r.status_code == 200:
            j = r.json()
            rec["usage"] = {"prompt": j["usage"]["prompt_tokens"], "completion": j["usage"]["completion_tokens"]}
            rec["ttft_s"] = float(r.headers["fireworks-server-time-to-first-token"])
            span = r.headers.get("x-ember-replica-span")
            if span:  # time from sending to the replica taking it: mostly the wait at the gate
                rec["to_replica_s"] = float(span.split(",")[0]) - sent_wall
        else:
            rec["code"] = r.json()["error"]["code"]
    except Exception as exc:  # timeouts and connection errors: counted, never fatal
        rec["status"] = type(exc).__name__
    rec["done_at"] = time.perf_counter() - t0
    return rec


async def open_loop(http, url: str, keys: dict[str, str], rates: dict[str, float], duration_s: float,
                    seed: int, spread: float = 0.0) -> tuple[list[dict], float]:
    """Poisson arrivals per account; returns the records and the phase's wall time. ``spread``:
    each request's max_tokens is drawn uniformly within +-spread of MAX_TOKENS (0: all equal)."""
    t0 = time.perf_counter()
    results: list[dict] = []

    async def account_loop(account: str, rate: float, rng: random.Random) -> None:
        lengths = random.Random(f"{seed}-{account}-lengths")  # arrivals stay those of spread 0
        tasks = []
        i = 0
        while (now := time.perf_counter() - t0) < duration_s:
            max_tokens = round(MAX_TOKENS * (1 + spread * (2 * lengths.random() - 1)))
            tasks.append(asyncio.create_task(
                one_request(http, url, keys[account], account, 8, max_tokens, seed * 100_000 + i, t0)))
            i += 1
            await asyncio.sleep(max(0.0, rng.expovariate(rate) - (time.perf_counter() - t0 - now)))
        results.extend(await asyncio.gather(*tasks))

    await asyncio.gather(*(account_loop(a, r, random.Random(f"{seed}-{a}")) for a, r in rates.items()))
    return results, time.perf_counter() - t0


async def closed_loop(http, url: str, keys: dict[str, str], clients: int, duration_s: float) -> list[dict]:
    t0 = time.perf_counter()
    results: list[dict] = []

    async def client(account: str, c: int) -> None:
        words, max_tokens = SHAPES[account]
        i = 0
        while time.perf_counter() - t0 < duration_s:
            results.append(await one_request(http, url, keys[account], account, words, max_tokens,
                                             c * 100_000 + i, t0))
            i += 1

    await asyncio.gather(*(client(a, c) for a in SHAPES for c in range(clients)))
    return results


def quiet_summary(results: list[dict], wall_s: float) -> dict:
    quiet = [r for r in results if r["account"] in QUIET]
    ok = sorted(r["ttft_s"] for r in quiet if r["status"] == 200)
    to_replica = sorted(r["to_replica_s"] for r in quiet if "to_replica_s" in r)
    noisy = [r for r in results if r["account"] == "noisy"]
    return {
        "quiet_sent": len(quiet), "quiet_ok": len(ok),
        "quiet_503": sum(1 for r in quiet if r["status"] == 503),
        "quiet_ttft_p50_ms": percentile(ok, 50) * 1e3 if ok else None,
        "quiet_ttft_p99_ms": percentile(ok, 99) * 1e3 if ok else None,
        "quiet_to_replica_p50_ms": percentile(to_replica, 50) * 1e3 if to_replica else None,
        "quiet_to_replica_p99_ms": percentile(to_replica, 99) * 1e3 if to_replica else None,
        "noisy_sent": len(noisy), "noisy_ok": sum(1 for r in noisy if r["status"] == 200),
        "noisy_503": sum(1 for r in noisy if r["status"] == 503),
        "other_errors": sum(1 for r in results if r["status"] not in (200, 503)),
        "completed_rps": sum(1 for r in results if r["status"] == 200) / wall_s,
    }


def backlog_summary(results: list[dict], skip_s: float, end_s: float) -> dict:
    """Service counted when a replica takes the request (the start of its x-ember-replica-span,
    right after the gate hands it a slot; else its first token); the largest difference over any interval
    within [skip_s, end_s]: both accounts backlogged (not while the first requests take the free
    slots, nor after the clients stop and the queues drain)."""
    ok = [r for r in results if r["status"] == 200]
    events = sorted((r["sent_at"] + r.get("to_replica_s", r["ttft_s"]), r["account"],
                     r["usage"]["prompt"] + 2 * r["usage"]["completion"]) for r in ok)
    served = dict.fromkeys(SHAPES, 0.0)
    a, b = SHAPES
    diffs = []
    for t, account, cost in events:
        served[account] += cost
        if skip_s <= t <= end_s:
            diffs.append(served[a] - served[b])
    max_in = max((r["usage"]["prompt"] for r in ok), default=0)
    max_out = max((r["usage"]["completion"] for r in ok), default=0)
    return {
        "requests": {acct: sum(1 for r in ok if r["account"] == acct) for acct in SHAPES},
        "weighted_served": served,
        "max_interval_difference": (max(diffs) - min(diffs)) if diffs else None,
        "vtc_bound": 2 * max(max_in, 2 * max_out),
        "max_prompt_tokens": max_in, "max_completion_tokens": max_out,
        "other_errors": sum(1 for r in results if r["status"] not in (200, 503)),
        "shed_503": sum(1 for r in results if r["status"] == 503),
    }


async def make_keys(http, base: str, app: str, accounts: list[str]) -> dict[str, str]:
    h = {"Authorization": f"Bearer {ADMIN}"}
    keys = {}
    for acct in accounts:
        await http.post(f"{base}/{app}/admin/accounts", json={"id": acct}, headers=h)
        r = await http.post(f"{base}/{app}/admin/accounts/{acct}/keys", headers=h)
        keys[acct] = r.json()["key"]
    return keys


async def run(args) -> dict:
    import httpx
    from ray import serve

    from cluster.builder import build_app

    os.environ["EMBER_ADMIN_TOKEN"] = ADMIN
    base, _ = start_ray_serve()
    cap = REPLICAS * SEQS / service_time_s()
    quiet_rate = args.quiet_share * cap
    out: dict = {"capacity_rps": cap, "quiet_rate_rps": quiet_rate, "noisy_rate_rps": 10 * quiet_rate,
                 "mixed": {}, "backlogged": {}}
    try:
        for order in ORDERS:  # separate apps, separate memory:// stores, one deployment each
            serve.run(build_app(config(order, headroom=args.headroom)), name=order, route_prefix=f"/{order}")
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
        async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as http:
            accounts = QUIET + ["noisy", *SHAPES]
            keys = {o: await make_keys(http, base, o, accounts) for o in ORDERS}
            url = {o: f"{base}/{o}/v1/chat/completions" for o in ORDERS}
            quiet_rates = dict.fromkeys(QUIET, quiet_rate)
            for o in ORDERS:  # warm both pools
                await open_loop(http, url[o], keys[o], quiet_rates, 3, seed=1)
            alone, wall = await open_loop(http, url["vtc"], keys["vtc"], quiet_rates, args.alone_s, seed=2,
                                          spread=args.spread)
            out["alone"] = quiet_summary(alone, wall)
            for o in ORDERS:  # the same arrival sequence (seed) for both orders
                res, wall = await open_loop(http, url[o], keys[o], {**quiet_rates, "noisy": 10 * quiet_rate},
                                            args.mixed_s, seed=3, spread=args.spread)
                out["mixed"][o] = quiet_summary(res, wall)
                await asyncio.sleep(2)  # let the queue drain before the next phase
            # Two backlogged accounts: more clients than slots, and a queue bound long enough that
            # neither is shed (a shed request leaves its account's queue for a moment).
            for order in ORDERS:
                serve.run(build_app(config(order, args.backlog_queue_wait_s, args.headroom)), name=order, route_prefix=f"/{order}")
            keys = {o: await make_keys(http, base, o, list(SHAPES)) for o in ORDERS}
            for o in ORDERS:
                res = await closed_loop(http, url[o], keys[o], args.backlog_clients, args.backlog_s)
                out["backlogged"][o] = backlog_summary(res, skip_s=2.0, end_s=args.backlog_s)
                await asyncio.sleep(2)
    finally:
        stop_ray_serve()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--alone-s", type=float, default=30)
    ap.add_argument("--mixed-s", type=float, default=45)
    ap.add_argument("--backlog-s", type=float, default=30)
    ap.add_argument("--backlog-queue-wait-s", type=float, default=30,
                    help="ingress.max_queue_wait_s in the backlogged phase")
    ap.add_argument("--backlog-clients", type=int, default=40,
                    help="closed-loop clients per backlogged account (more than the pool's 16 slots)")
    ap.add_argument("--quiet-share", type=float, default=0.08,
                    help="each quiet account's rate, as a share of the pool's nominal capacity")
    ap.add_argument("--timeout", type=float, default=60, help="client timeout: any hit counts as an error")
    ap.add_argument("--spread", type=float, default=0.0,
                    help="max_tokens of each request uniform within +-this share of the mean (0: every "
                         "request the same length, so a saturated pool's requests end in waves)")
    ap.add_argument("--headroom", type=float, default=None,
                    help="engine.fair_share_headroom for both apps (default: the config's; fcfs never uses it)")
    ap.add_argument("--out", default="bench_results/fairness.json")
    args = ap.parse_args()
    if not 0 <= args.spread < 1:
        ap.error("--spread must be at least 0 and below 1")
    if args.small:
        args.alone_s, args.mixed_s, args.backlog_s = 15, 25, 20
    res = asyncio.run(run(args))

    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    alone = res["alone"]
    print(f"\npool capacity ~{res['capacity_rps']:.1f} req/s; 4 quiet accounts at {res['quiet_rate_rps']:.2f} "
          f"req/s each, noisy at {res['noisy_rate_rps']:.1f} req/s\n")
    rows = [["quiet alone", alone["quiet_sent"], alone["quiet_ok"], alone["quiet_503"], f(alone["quiet_ttft_p50_ms"]),
             f(alone["quiet_ttft_p99_ms"]), f(alone["quiet_to_replica_p99_ms"]), "-", "-", "-",
             f(alone["completed_rps"], "{:.2f}")]]
    for o in ORDERS:
        m = res["mixed"][o]
        rows.append([f"noisy + quiet, {o}", m["quiet_sent"], m["quiet_ok"], m["quiet_503"], f(m["quiet_ttft_p50_ms"]),
                     f(m["quiet_ttft_p99_ms"]), f(m["quiet_to_replica_p99_ms"]), m["noisy_sent"], m["noisy_503"], m["other_errors"],
                     f(m["completed_rps"], "{:.2f}")])
    print_table(["phase", "quiet sent", "quiet 200", "quiet 503", "quiet TTFT p50 ms", "quiet TTFT p99 ms",
                 "quiet to replica p99 ms", "noisy sent", "noisy 503", "other err", "completed/s"], rows)
    print()
    print_table(["backlogged", "requests A", "requests B", "weighted A", "weighted B", "max interval diff",
                 "VTC bound", "503", "other err"],
                [[o, b["requests"]["heavy-in"], b["requests"]["heavy-out"], f(b["weighted_served"]["heavy-in"], "{:.0f}"),
                  f(b["weighted_served"]["heavy-out"], "{:.0f}"), f(b["max_interval_difference"], "{:.0f}"),
                  b["vtc_bound"], b["shed_503"], b["other_errors"]]
                 for o, b in res["backlogged"].items()])

    vtc, fcfs = res["mixed"]["vtc"], res["mixed"]["fcfs"]
    ratio = (vtc["quiet_ttft_p99_ms"] / alone["quiet_ttft_p99_ms"]
             if vtc["quiet_ttft_p99_ms"] and alone["quiet_ttft_p99_ms"] else None)
    fcfs_ratio = (fcfs["quiet_ttft_p99_ms"] / alone["quiet_ttft_p99_ms"]
                  if fcfs["quiet_ttft_p99_ms"] and alone["quiet_ttft_p99_ms"] else None)
    thr = vtc["completed_rps"] / fcfs["completed_rps"] if fcfs["completed_rps"] else None
    bl = res["backlogged"]["vtc"]
    goals = {
        "quiet_p99_ttft_vs_alone_vtc": (ratio, ratio is not None and ratio <= 1.5),
        "quiet_p99_ttft_vs_alone_fcfs (reference)": (fcfs_ratio, None),
        "throughput_vtc_vs_fcfs": (thr, thr is not None and thr >= 0.95),
        "backlogged_difference_within_bound_vtc": (
            f"{f(bl['max_interval_difference'], '{:.0f}')} / {bl['vtc_bound']}",
            bl["max_interval_difference"] is not None and bl["max_interval_difference"] <= bl["vtc_bound"]),
        "backlogged_difference_fcfs (reference)": (
            f"{f(res['backlogged']['fcfs']['max_interval_difference'], '{:.0f}')} / "
            f"{res['backlogged']['fcfs']['vtc_bound']}", None),
    }
    print()
    print_table(["goal", "value", "result"],
                [[k, f(v, "{:.2f}") if isinstance(v, float) else str(v),
                  "-" if ok is None else ("PASS" if ok else "MISS")] for k, (v, ok) in goals.items()])
    res["goals"] = {k: {"value": v, "pass": ok} for k, (v, ok) in goals.items()}
    res["args"] = vars(args)
    print("wrote", write_json(args.out, res))


if __name__ == "__main__":
    main()

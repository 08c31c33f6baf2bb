"""Autoscaling under a load step: Ember's policy with a gate that follows the pool, against Serve's
default autoscaling with the gate fixed at the config's minimum (the behaviour before live capacity).

One SimEngine model autoscaling 1..4 replicas gets Poisson arrivals at 0.8x one replica's capacity
(warm-up), then a step to 4x for ``--step-s``. A replica's capacity is what a fixed one-replica pool
of the same engine really serves on this machine, measured first in the same run
(``--step-capacity measured``, the default), or the engine's nominal ``max_num_seqs`` over its
service time (``nominal``: a step to 4x nominal offers 4 replicas more than they really serve on a
busy 2-core box, so some refusals are the rule working, not the scale-up). Each variant is deployed, driven and deleted in
turn, in one Ray session:

- ``ember-app``: the same pool under the application-level ``EmberAppPolicy``, deployed from a
  config as ``serve deploy`` / ``serve run ray_configs/sim.yaml`` do: it sees the ingress gate's
  queue per tier beside the pool's sequences, so one look at a 4x step asks for 4 replicas;
- ``ember``: ``policy: ember`` (``EmberPoolPolicy``, deployment level as under ``serve.run``:
  it sees the pool's running and waiting sequences, not the gate's queue, so a full pool looks
  only "full", 1.25x its target, and it grows one replica per look), gate following the
  running replicas, waiting up to ``replica_start_s`` while the pool is below its maximum;
- ``serve``: Serve's default policy (``target_ongoing_requests`` = 0.8 x max_num_seqs,
  ``upscale_delay_s`` 5 s, metrics every 10 s as Serve defaults), gate fixed at one replica.

Then the load falls back to 0.8x for ``--cool-s`` (streamed requests, each read to its
``[DONE]``), with the pools' ``downscale_delay_s`` at ``--downscale-delay-s``.

Reported per variant: seconds from the step until 4 replicas run, throughput once 4 run against
4x one replica's capacity, the share of requests refused (503) during the step (and, beside it,
the shortfall: the share of the 4x load that 4 running replicas did not serve, which no policy
at the maximum size can admit within the bound, and the refusals beyond it), and
replica-seconds during the step against an oracle that runs 4 replicas from the step's start;
for the fall: seconds until one replica runs again, streams that failed or were cut (goal 0),
scale reversals over the whole run (a rise after a fall or a fall after a rise), and
replica-seconds over step and fall against the oracle (4 in the step, 1 after it).

    python tests/benchmarks/autoscale.py            # ~6 min
    python tests/benchmarks/autoscale.py --small    # ~4 min
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks._common import print_table, start_ray_serve, stop_ray_serve, write_json  # noqa: E402

MODEL = "accounts/ember/models/autoscale"
DEPLOYMENT = "pool-ember-models-autoscale"
ADMIN = "bench-admin-token"
MAX_TOKENS = 32
SEQS = 4
TARGET_UTILIZATION = 0.8  # the policy's default (policies.autoscale.Knobs)
MAX_REPLICAS = 4
LATENCY = {"step_base_s": 0.03, "decode_s_per_seq": 0.0005, "prefill_base_s": 0.002,
           "prefill_s_per_token": 0.00001}


def config(variant: str, downscale_delay_s: float = 60) -> dict:
    if variant == "fixed":  # one replica, for measuring what a replica really serves
        auto = None
    elif variant in ("ember", "ember-app"):
        auto = {"min_replicas": 1, "max_replicas": MAX_REPLICAS, "policy": "ember",
                "downscale_delay_s": downscale_delay_s, "replica_start_s": 30}
    else:
        auto = {"min_replicas": 1, "max_replicas": MAX_REPLICAS, "policy": "serve",
                "target_ongoing_requests": 0.8 * SEQS, "upscale_delay_s": 5,
                "downscale_delay_s": downscale_delay_s, "gate_follows_replicas": False}
    return {
        "models": [{
            "id": MODEL, "context_length": 1024, "resources": {"num_cpus": 0.1},
            **({"autoscaling": auto} if auto else {"num_replicas": 1}),
            "engine": {"kind": "sim", "block_size": 32, "max_num_seqs": SEQS, "latency": LATENCY},
        }],
        "ingress": {"num_cpus": 0.2, "access_log": False, "max_queue_wait_s": 2.0,
                    "max_concurrent_per_account": 4096},  # one benchmark account: no per-account cap
        "rate_limit": {"enabled": False},
    }


def service_time_s() -> float:
    return MAX_TOKENS * (LATENCY["step_base_s"] + LATENCY["decode_s_per_seq"] * SEQS)


def replica_capacity_rps() -> float:
    return SEQS / service_time_s()


async def measure_replica_rps(http, base: str, key: str, duration_s: float = 12.0, settle_s: float = 3.0) -> float:
    """What one replica really serves on this machine: a fixed one-replica pool of the same engine,
    kept full by twice its sequences in closed loop (so a request always waits at the gate),
    completions per second after ``settle_s``."""
    from ray import serve

    from cluster.builder import build_app

    app = "autoscale-capacity"
    serve.run(build_app(config("fixed")), name=app, route_prefix=f"/{app}")
    url = f"{base}/{app}/v1/chat/completions"
    done: list[float] = []
    t0 = time.perf_counter()

    async def client(c: int) -> None:
        i = 0
        while time.perf_counter() - t0 < duration_s:
            body = {"model": MODEL, "max_tokens": MAX_TOKENS, "seed": c * 100_000 + i,
                    "messages": [{"role": "user", "content": f"Capacity {c}-{i}."}]}
            i += 1
            try:
                r = await http.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
            except Exception:  # a timeout or a dropped connection: not a completion
                continue
            if r.status_code == 200:
                done.append(time.perf_counter() - t0)

    try:
        await asyncio.gather(*(client(c) for c in range(2 * SEQS)))
    finally:
        serve.delete(app)
    rps = sum(1 for t in done if settle_s <= t <= duration_s) / (duration_s - settle_s)
    if rps <= 0:
        raise RuntimeError("the one-replica pool served nothing while its capacity was measured")
    return rps


async def open_loop(http, url: str, key: str, rate: float, duration_s: float, seed: int,
                    t_origin: float, phase: str, stream: bool = False, model: str = MODEL) -> list[dict]:
    rng = random.Random(seed)
    results: list[dict] = []
    tasks = []

    async def one(i: int) -> None:
        body = {"model": model, "max_tokens": MAX_TOKENS, "seed": i, "stream": stream,
                "messages": [{"role": "user", "content": f"Request {i} of {phase}."}]}
        rec: dict = {"phase": phase, "sent_at": time.perf_counter() - t_origin}
        sent = time.perf_counter()
        try:
            async with http.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
                lines, first = [], None
                async for line in r.aiter_lines():
                    if first is None and line.startswith("data:"):
                        first = time.perf_counter()
                    lines.append(line)
            rec["status"] = r.status_code
            if r.status_code == 200 and not stream:
                rec["ttft_s"] = float(r.headers["fireworks-server-time-to-first-token"])
            elif r.status_code == 200:
                rec["ttft_s"] = first - sent if first is not None else None  # client-side for streams
                # A stream that broke off, or ended in an error event, failed however it began.
                text = "\n".join(lines)
                if not text.rstrip().endswith("data: [DONE]") or '"error"' in text:
                    rec["status"] = "stream_cut"
        except Exception as exc:
            rec["status"] = type(exc).__name__
        rec["done_at"] = time.perf_counter() - t_origin
        results.append(rec)

    start = time.perf_counter()
    i = 0
    while (now := time.perf_counter() - start) < duration_s:
        tasks.append(asyncio.create_task(one(seed * 1_000_000 + i)))
        i += 1
        await asyncio.sleep(max(0.0, rng.expovariate(rate) - (time.perf_counter() - start - now)))
    await asyncio.gather(*tasks)
    return results


async def watch_replicas(app: str, t_origin: float, stop: asyncio.Event, out: list, gates: list,
                         pools: dict[str, str] | None = None) -> None:
    """Running replicas (Serve's status) and the gate's slots and queue (the ingress's gate_state),
    four times a second. ``pools`` maps model id to deployment name (default: the one model);
    with several, ``out`` and ``gates`` get the model id after the time."""
    from ray import serve

    ingress = serve.get_app_handle(app)
    several = pools is not None
    pools = pools or {MODEL: DEPLOYMENT}
    while not stop.is_set():
        now = time.perf_counter() - t_origin
        try:
            st = await asyncio.to_thread(serve.status)
            for model, deployment in pools.items():
                running = int(st.applications[app].deployments[deployment].replica_states.get("RUNNING", 0))
                out.append((now, model, running) if several else (now, running))
        except Exception:
            pass
        try:
            state = await ingress.gate_state.remote()
            for model in pools:
                g = state[model]
                row = (g["slots"], g["in_flight"], g["waiting"])
                gates.append((now, model, *row) if several else (now, *row))
        except Exception:
            pass
        await asyncio.sleep(0.25)


def replica_seconds(timeline: list[tuple[float, int]], start: float, end: float) -> float:
    """The integral of running replicas over [start, end] (a step function over the samples)."""
    rs = 0.0
    prev_t, prev_n = start, next((n for t, n in reversed(timeline) if t <= start), 1)
    for t, n in ((t, n) for t, n in timeline if start <= t <= end):
        rs += prev_n * (t - prev_t)
        prev_t, prev_n = t, n
    return rs + prev_n * (end - prev_t)


def reversals(timeline: list[tuple[float, int]]) -> int:
    """Changes of direction in the replica count: a fall after a rise, or a rise after a fall."""
    moves = [b - a for (_, a), (_, b) in zip(timeline, timeline[1:]) if b != a]
    return sum(1 for x, y in zip(moves, moves[1:]) if (x > 0) != (y > 0))


def analyse(variant: str, results: list[dict], timeline: list[tuple[float, int]], warm_s: float,
            step_s: float, cool_s: float = 0.0, cap: float | None = None) -> dict:
    """``cap``: one replica's capacity the load was drawn from (default: nominal)."""
    cap = cap or replica_capacity_rps()
    step_start, step_end = warm_s, warm_s + step_s
    step = [r for r in results if r["phase"] == "step"]
    reach = next((t for t, n in timeline if t >= step_start and n >= MAX_REPLICAS), None)
    ok_done = sorted(r["done_at"] for r in results if r["status"] == 200)
    if reach is not None and step_end - reach > 2:
        completed = sum(1 for t in ok_done if reach <= t <= step_end)
        thr = completed / (step_end - reach)
    else:
        thr = None
    rs = replica_seconds(timeline, step_start, step_end)
    oracle = MAX_REPLICAS * step_s
    target = MAX_REPLICAS * cap
    return {
        "variant": variant,
        "time_to_target_s": None if reach is None else reach - step_start,
        "max_replicas_seen": max((n for _, n in timeline), default=0),
        "throughput_at_target_rps": thr,
        "target_throughput_rps": target,
        "throughput_ratio": None if thr is None else thr / target,
        "step_sent": len(step),
        "step_refused_share": sum(1 for r in step if r["status"] == 503) / max(1, len(step)),
        # What 4 replicas could not serve of the 4x load even once all ran (on a shared 2-core box
        # they serve less than 4x one replica alone): refusals up to this share are the shedding
        # rule working at the maximum size, not the scale-up.
        "step_shortfall_share": None if thr is None else max(0.0, 1 - thr / target),
        "step_other_errors": sum(1 for r in step if r["status"] not in (200, 503)),
        "step_statuses": {str(k): sum(1 for r in step if r["status"] == k) for k in {r["status"] for r in step}},
        "replica_seconds": rs,
        "oracle_replica_seconds": oracle,
        "replica_seconds_ratio": rs / oracle,
        "timeline": timeline,
        **(analyse_fall(results, timeline, step_end, cool_s, thr, cap) if cool_s > 0 else {}),
    }


def analyse_fall(results: list[dict], timeline: list[tuple[float, int]], step_end: float,
                 cool_s: float, thr_at_max: float | None = None, cap: float | None = None) -> dict:
    """The fall. Two oracles for it: the strict one runs 1 replica (the load is 0.8x one
    replica's capacity ``cap``, measured or nominal); the other plans as the policy does, for the load at
    ``target_utilization`` (0.8) of the capacity a replica really had in the step
    (``thr_at_max`` / 4), which at 0.8x nominal is usually 2 replicas."""
    cool = [r for r in results if r["phase"] == "cool"]
    real_rps = thr_at_max / MAX_REPLICAS if thr_at_max else None
    at_target = (max(1, math.ceil(0.8 * (cap or replica_capacity_rps()) / (real_rps * TARGET_UTILIZATION) - 1e-9))
                 if real_rps else None)
    down = next((t for t, n in timeline if t >= step_end and n <= 1), None)
    whole = replica_seconds(timeline, step_end, step_end + cool_s)
    return {
        "cool_sent": len(cool),
        "cool_failed_streams": sum(1 for r in cool if r["status"] not in (200, 503)),
        "cool_refused": sum(1 for r in cool if r["status"] == 503),
        "cool_statuses": {str(k): sum(1 for r in cool if r["status"] == k) for k in {r["status"] for r in cool}},
        "time_to_one_replica_s": None if down is None else down - step_end,
        "replicas_at_end": timeline[-1][1] if timeline else None,
        "reversals": reversals(timeline),
        "cool_replica_seconds": whole,
        "cool_oracle_replica_seconds": 1.0 * cool_s,
        "cool_oracle_at_target_replicas": at_target,
        "cool_oracle_at_target_replica_seconds": None if at_target is None else at_target * cool_s,
    }


def deploy_with_app_policy(app: str, args: dict, **policy_kwargs) -> None:
    """Deploy from a config, as ``serve deploy`` does: only that path takes an app-level policy.
    ``policy_kwargs`` (``max_total_replicas``) go to the policy beside the first model's knobs."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from cluster.config import AutoscalingConfig
    from deployments.autoscaling import POLICY_APP

    knobs = AutoscalingConfig.model_validate(args["models"][0]["autoscaling"]).knobs()
    schema = ServeDeploySchema.model_validate({"applications": [{
        "name": app, "route_prefix": f"/{app}", "import_path": "cluster.builder:build_app", "args": args,
        "autoscaling_policy": {"policy_function": POLICY_APP, "policy_kwargs": {**knobs, **policy_kwargs}},
    }]})
    _get_global_client().deploy_apps(schema, _blocking=True)


async def run_variant(http, base: str, key: str, variant: str, args) -> dict:
    from ray import serve

    from cluster.builder import build_app

    app = f"autoscale-{variant}"
    cap = args.cap
    if variant == "ember-app":
        deploy_with_app_policy(app, config(variant, args.downscale_delay_s))
    else:
        serve.run(build_app(config(variant, args.downscale_delay_s)), name=app, route_prefix=f"/{app}")
    url = f"{base}/{app}/v1/chat/completions"
    try:
        t0 = time.perf_counter()
        stop = asyncio.Event()
        timeline: list[tuple[float, int]] = []
        gates: list[tuple[float, int, int, int]] = []
        watcher = asyncio.create_task(watch_replicas(app, t0, stop, timeline, gates))
        warm = await open_loop(http, url, key, 0.8 * cap, args.warm_s, 1, t0, "warm")
        step = await open_loop(http, url, key, 4 * cap, args.step_s, 2, t0, "step")
        cool = (await open_loop(http, url, key, 0.8 * cap, args.cool_s, 3, t0, "cool", stream=True)
                if args.cool_s > 0 else [])
        stop.set()
        await watcher
        out = analyse(variant, warm + step + cool, timeline, args.warm_s, args.step_s, args.cool_s, cap)
        # For notebooks/autoscale_step.ipynb: the gate over time and every request.
        out["gate_timeline"] = gates
        out["requests"] = [[r["sent_at"], r["done_at"], r["status"], r.get("ttft_s")] for r in warm + step + cool]
        out["step_start_s"] = args.warm_s
        return out
    finally:
        serve.delete(app)


async def run(args) -> list[dict]:
    import httpx

    os.environ["EMBER_ADMIN_TOKEN"] = ADMIN
    base, _ = start_ray_serve()
    try:
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
        async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as http:
            # Each app has its own memory:// store; the demo key is seeded in every one of them.
            key = os.environ["EMBER_DEMO_KEY"]
            args.cap = replica_capacity_rps()
            if args.step_capacity == "measured":
                args.cap = await measure_replica_rps(http, base, key)
            return [await run_variant(http, base, key, v, args) for v in args.variants]
    finally:
        stop_ray_serve()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--warm-s", type=float, default=15)
    ap.add_argument("--step-s", type=float, default=75)
    ap.add_argument("--cool-s", type=float, default=60, help="seconds at 0.8x after the step (0: none)")
    ap.add_argument("--downscale-delay-s", type=float, default=10)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--variants", nargs="+", default=["ember-app", "ember", "serve"],
                    choices=["ember-app", "ember", "serve"])
    ap.add_argument("--step-capacity", choices=["measured", "nominal"], default="measured",
                    help="one replica's capacity the 0.8x and 4x loads are drawn from: what a fixed "
                         "one-replica pool really serves on this machine, measured first, or the "
                         "engine's nominal max_num_seqs / service time")
    ap.add_argument("--out", default="bench_results/autoscale.json")
    args = ap.parse_args()
    if args.small:
        args.warm_s, args.step_s, args.cool_s = 8, 40, 40
    os.environ.setdefault("EMBER_DEMO_KEY", "bench-demo-key-0001")
    res = asyncio.run(run(args))

    print(f"\none replica ~{args.cap:.2f} req/s ({args.step_capacity}; nominal {replica_capacity_rps():.2f}); "
          f"step 0.8x -> 4x of it; pool 1..{MAX_REPLICAS}\n")

    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    print_table(["variant", "t to 4 replicas s", "max replicas", "rps at 4", "rps target", "ratio",
                 "step sent", "refused %", "shortfall %", "refused beyond %", "other err", "replica-s", "oracle",
                 "ratio"],
                [[r["variant"], f(r["time_to_target_s"]), r["max_replicas_seen"], f(r["throughput_at_target_rps"]),
                  f(r["target_throughput_rps"]), f(r["throughput_ratio"]), r["step_sent"],
                  f(100 * r["step_refused_share"], "{:.1f}"), f(_pct(r["step_shortfall_share"]), "{:.1f}"),
                  f(_pct(None if r["step_shortfall_share"] is None
                         else r["step_refused_share"] - r["step_shortfall_share"]), "{:.1f}"),
                  r["step_other_errors"], f(r["replica_seconds"], "{:.0f}"),
                  f(r["oracle_replica_seconds"], "{:.0f}"), f(r["replica_seconds_ratio"])] for r in res])
    if args.cool_s > 0:
        print(f"\nthen 0.8x for {args.cool_s:.0f} s, streamed; downscale_delay_s {args.downscale_delay_s:.0f}\n")
        print_table(["variant", "t to 1 replica s", "replicas at end", "streams", "failed/cut", "refused",
                     "reversals", "replica-s step+fall", "oracle", "ratio", "oracle at target", "ratio"],
                    [[r["variant"], f(r["time_to_one_replica_s"], "{:.1f}"), r["replicas_at_end"], r["cool_sent"],
                      r["cool_failed_streams"], r["cool_refused"], r["reversals"],
                      f(r["replica_seconds"] + r["cool_replica_seconds"], "{:.0f}"),
                      f(r["oracle_replica_seconds"] + r["cool_oracle_replica_seconds"], "{:.0f}"),
                      f((r["replica_seconds"] + r["cool_replica_seconds"])
                        / (r["oracle_replica_seconds"] + r["cool_oracle_replica_seconds"])),
                      _at_target(r, lambda v: f(v, "{:.0f}")),
                      _at_target(r, lambda v: f((r["replica_seconds"] + r["cool_replica_seconds"]) / v))]
                     for r in res])
    print("wrote", write_json(args.out, {"args": vars(args), "results": res}))


def _pct(v: float | None) -> float | None:
    return None if v is None else 100 * v


def _at_target(r: dict, fmt) -> str:
    """Formats the step's oracle plus the fall's oracle at target utilization ("-" if unknown)."""
    fall = r.get("cool_oracle_at_target_replica_seconds")
    return "-" if fall is None else fmt(r["oracle_replica_seconds"] + fall)


if __name__ == "__main__":
    main()

"""Batch inference goals on SimEngine, side by side in one run: faults, interactive TTFT, throughput,
prefix-cache share and cancel.

    python tests/benchmarks/batch.py [--lines 10000] [--out bench_results/batch.json]

One app (2 sim replicas × 16 sequences, Redis store on a private redis-server, rate limits off so
that the engine path is what is measured) serves every scenario:

- faults: a ``--lines`` batch while the runner, one pool replica and the ingress are each killed
  once (at 20%, 45% and 70% of the lines): output lines, each custom_id once, ledger batch events
  against lines;
- ttft: interactive p99 time to first token under a steady closed-loop load, alone and with a
  10,000-line batch running beside it, in turns (``--ttft-rounds``) so that the machine's other
  load falls on both sides alike (goal ≤ 1.1×);
- throughput: the same requests sent interactively (as many at once as the pool has slots) and as
  a batch on an otherwise idle pool (goal ≥ 0.9×);
- cache: the cached-token share of a batch whose lines share system prompts against an oracle
  (one unbounded prefix cache replaying the same prompts; goal ≥ 0.9×);
- cancel: seconds from cancel to ``cancelled`` mid-batch (goal < 10 s).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.benchmarks._common import (  # noqa: E402
    closed_loop,
    latency_summary_ms,
    machine_info,
    print_table,
    start_ray_serve,
    stop_ray_serve,
    write_json,
)
from tests.faults.harness import App, PrivateRedis  # noqa: E402

MODEL = "accounts/ember/models/batch-bench"
SLOTS = 32  # 2 replicas × 16 sequences


def config(store: str) -> dict:
    return {
        "models": [{
            "id": MODEL, "context_length": 2048, "num_replicas": 2, "resources": {"num_cpus": 0.1},
            "engine": {"kind": "sim", "block_size": 16, "max_num_seqs": 16, "cache_capacity_tokens": 1 << 17,
                       "stream_interval_s": 0.02,
                       "latency": {"step_base_s": 0.004, "decode_s_per_seq": 0.0002, "prefill_base_s": 0.002,
                                   "prefill_s_per_token": 0.00002}},
        }],
        "ingress": {"num_cpus": 0.1, "max_completion_tokens": 256, "access_log": False, "request_timeout_s": 60,
                    "max_concurrent_per_account": 256},
        "store": {"url": store},
        "rate_limit": {"enabled": False},
        "batch": {"max_concurrency": 48, "poll_interval_s": 0.25},
    }


def _client(app: App):
    import openai

    from tests.conftest import DEMO_KEY

    return openai.OpenAI(base_url=app.base, api_key=DEMO_KEY, max_retries=8, timeout=60)


class Reached(Exception):
    """Raised by an ``on_update`` to stop watching."""


def _watch(client, batch_id: str, timeout_s: float, on_update=None, until=None):
    """``batch_client.watch`` that rides out an ingress restart (polls fail meanwhile)."""
    from cluster.batch_client import FINAL, watch

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return watch(client, batch_id, on_update=on_update, poll_s=0.1,
                         timeout_s=max(1.0, deadline - time.monotonic()), until=until or FINAL)
        except (TimeoutError, Reached):
            raise
        except Exception as exc:  # the ingress is restarting
            if time.monotonic() > deadline:
                raise
            print(f"  poll failed ({type(exc).__name__}); retrying", flush=True)
            time.sleep(0.5)


def _until_completed(n: int):
    def check(b):
        if b.request_counts and b.request_counts.completed >= n:
            raise Reached
    return check


def _batch_events(client) -> int:
    import httpx

    rows = client.get("/usage", cast_to=httpx.Response).json()["data"]
    return sum(r["batch"]["requests"] for r in rows)


def _kill(app: App, deployment: str) -> None:
    import ray

    name = app._actors(deployment)[0]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)


# -- scenarios ------------------------------------------------------------------------------------

def scenario_faults(app: App, n: int) -> dict:
    from cluster.batch_client import results, sample_lines, submit, to_jsonl

    client = _client(app)
    before = _batch_events(client)
    t0 = time.monotonic()
    batch = submit(client, to_jsonl(sample_lines(n, MODEL, max_tokens=2, systems=50, system_words=20)))
    plan = [(0.20, "batch-runner"), (0.45, app.pool_name), (0.70, "ingress")]
    killed: list[str] = []

    def on_update(b):
        done = b.request_counts.completed + b.request_counts.failed if b.request_counts else 0
        while plan and done >= plan[0][0] * n:
            _, dep = plan.pop(0)
            print(f"  killing {dep} at {done}/{n} lines", flush=True)
            _kill(app, dep)
            killed.append(dep)

    final = _watch(client, batch.id, timeout_s=3600, on_update=on_update)
    elapsed = time.monotonic() - t0
    rows = results(client, final)
    ids = [r["custom_id"] for r in rows]
    time.sleep(2)  # the ingress's outbox drains within its retry interval
    events = _batch_events(client) - before
    return {"scenario": "faults", "lines": n, "status": final.status, "output_lines": len(rows),
            "unique_custom_ids": len(set(ids)), "lost": n - len(set(ids)), "twice": len(ids) - len(set(ids)),
            "ledger_events": events, "killed": killed, "elapsed_s": round(elapsed, 1),
            "lines_per_s": round(n / elapsed, 1), "ok": final.status == "completed" and len(set(ids)) == n
            and len(ids) == n and events == n}


async def _interactive(base: str, stop, concurrency: int, samples: list) -> None:
    """``concurrency`` streaming clients, one request after another until ``stop`` is set;
    appends (start time, TTFT) per request to ``samples``, and (start, None) per failure."""
    import httpx

    from tests.conftest import DEMO_KEY

    body = {"model": MODEL, "max_tokens": 16, "stream": True,
            "messages": [{"role": "user", "content": "an interactive question, short and sweet"}]}
    headers = {"Authorization": f"Bearer {DEMO_KEY}"}

    async def worker(client) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            ttft = None
            try:
                async with client.stream("POST", base + "/chat/completions", json=body, headers=headers) as r:
                    if r.status_code == 200:
                        async for line in r.aiter_lines():
                            if ttft is None and line.startswith("data: ") and '"content"' in line:
                                ttft = time.perf_counter() - t0
            except Exception:  # counted as a failure below
                ttft = None
            samples.append((t0, ttft))

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))


def scenario_ttft(app: App, duration_s: float, concurrency: int, rounds: int, lines: int) -> dict:
    """A steady interactive load runs throughout; windows alone and beside a ``lines``-line batch
    follow in turn, ``rounds`` times (``duration_s`` per side in all), so that a change in the
    machine's other load falls on both sides alike. Each round submits a fresh batch, lets the
    start settle (validation, the runner reading the file, the batch's first lines), measures
    a window, and cancels it. Requests are counted by the window they started in; those that
    started while a batch was starting or stopping are reported apart (``transitions``)."""
    import threading

    from cluster.batch_client import sample_lines, submit, to_jsonl

    client = _client(app)
    samples: list[tuple[float, float | None]] = []
    stop = threading.Event()
    load = threading.Thread(target=lambda: asyncio.run(_interactive(app.base, stop, concurrency, samples)))
    load.start()
    windows: dict[str, list[tuple[float, float]]] = {"alone": [], "with_batch": []}
    done = 0
    try:
        time.sleep(1.0)  # warm up
        for k in range(rounds):
            t0 = time.perf_counter()
            time.sleep(duration_s / rounds)
            windows["alone"].append((t0, time.perf_counter()))
            batch = submit(client, to_jsonl(sample_lines(lines, MODEL, max_tokens=16, systems=20, prefix=f"beside{k}")))
            try:
                _watch(client, batch.id, timeout_s=120, on_update=_until_completed(1))
            except Reached:
                pass
            time.sleep(1.0)
            t0 = time.perf_counter()
            time.sleep(duration_s / rounds)
            windows["with_batch"].append((t0, time.perf_counter()))
            done += client.batches.retrieve(batch.id).request_counts.completed
            client.batches.cancel(batch.id)
            _watch(client, batch.id, timeout_s=60)
            time.sleep(1.0)
    finally:
        stop.set()
        load.join()

    def within(side: str) -> list[tuple[float, float | None]]:
        return [x for x in samples if any(a <= x[0] < b for a, b in windows[side])]

    out = {}
    for side in windows:
        got = within(side)
        out[side] = {"requests": len(got), "errors": sum(1 for _, t in got if t is None),
                     "ttft_ms": latency_summary_ms([t for _, t in got if t is not None])}
    inside = {id(x) for side in windows for x in within(side)}
    rest = [t for x in samples if id(x) not in inside for t in [x[1]] if t is not None]
    a_ms, b_ms = out["alone"]["ttft_ms"], out["with_batch"]["ttft_ms"]
    ratio = b_ms["p99"] / a_ms["p99"]
    return {"scenario": "ttft", "concurrency": concurrency, "duration_s": duration_s, "rounds": rounds,
            "batch_lines": lines, **out, "transitions": {"ttft_ms": latency_summary_ms(rest)},
            "batch_lines_done_beside": done, "p50_ratio": round(b_ms["p50"] / a_ms["p50"], 3),
            "p99_ratio": round(ratio, 3), "ok": ratio <= 1.1 and not out["alone"]["errors"]
            and not out["with_batch"]["errors"]}


def scenario_throughput(app: App, n: int) -> dict:
    import httpx

    from cluster.batch_client import sample_lines, submit, to_jsonl
    from tests.conftest import DEMO_KEY

    rows = sample_lines(n, MODEL, max_tokens=16, systems=8, prefix="tp")
    client = _client(app)

    async def interactive() -> float:
        queue = list(rows)
        headers = {"Authorization": f"Bearer {DEMO_KEY}"}
        t0 = time.perf_counter()
        async with httpx.AsyncClient(timeout=60) as hc:
            async def worker():
                while queue:
                    r = await hc.post(app.base + "/chat/completions", json=queue.pop()["body"], headers=headers)
                    r.raise_for_status()
            await asyncio.gather(*(worker() for _ in range(SLOTS)))
        return time.perf_counter() - t0

    inter_s = asyncio.run(interactive())
    # "Otherwise idle": the pool has had no interactive request for the runner's quiet_s (1 s),
    # else its first second is the trickle it keeps beside interactive traffic.
    time.sleep(1.5)
    t0 = time.perf_counter()
    batch = submit(client, to_jsonl(rows))
    final = _watch(client, batch.id, timeout_s=1800)
    batch_s = time.perf_counter() - t0
    ratio = (n / batch_s) / (n / inter_s)
    return {"scenario": "throughput", "requests": n, "interactive_rps": round(n / inter_s, 1),
            "batch_rps": round(n / batch_s, 1), "batch_status": final.status, "ratio": round(ratio, 3),
            "ok": ratio >= 0.9 and final.status == "completed"}


def scenario_cache(app: App, groups: int, per_group: int) -> dict:
    from cluster.batch_client import results, sample_lines, submit, to_jsonl
    from cluster.config import demo_model_dir
    from deployments.openai_api import ChatCompletionRequest
    from deployments.prompts import PromptBuilder
    from policies.prefix_cache import PrefixCache, block_hashes

    n = groups * per_group
    rows = sample_lines(n, MODEL, max_tokens=4, systems=groups, system_words=120, prefix="cache")
    client = _client(app)
    final = _watch(client, submit(client, to_jsonl(rows)).id, timeout_s=1800)
    out = [r["response"]["body"]["usage"] for r in results(client, final)]
    prompt = sum(u["prompt_tokens"] for u in out)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in out)
    # The oracle: one cache without bound, replaying the same prompts in file order.
    builder = PromptBuilder(demo_model_dir())
    oracle = PrefixCache(block_size=16, capacity_tokens=1 << 40)
    oracle_cached = 0
    for r in rows:
        ids = builder.chat(ChatCompletionRequest.model_validate(r["body"]).messages)
        hashes = block_hashes(ids, 16)  # one account: its salt changes no count
        oracle_cached += oracle.match(hashes, len(ids))
        oracle.insert(hashes)
    share, oracle_share = cached / prompt, oracle_cached / prompt
    ratio = share / oracle_share if oracle_share else float("nan")
    return {"scenario": "cache", "lines": n, "groups": groups, "prompt_tokens": prompt, "cached_tokens": cached,
            "cached_share": round(share, 4), "oracle_share": round(oracle_share, 4), "ratio": round(ratio, 3),
            "ok": ratio >= 0.9}


def scenario_cancel(app: App) -> dict:
    from cluster.batch_client import results, sample_lines, submit, to_jsonl

    client = _client(app)
    batch = submit(client, to_jsonl(sample_lines(5_000, MODEL, max_tokens=32, prefix="cancel")))

    def until_some(b):
        if b.request_counts and b.request_counts.completed >= 50:
            raise Reached

    try:
        _watch(client, batch.id, timeout_s=120, on_update=until_some)
    except Reached:
        pass
    t0 = time.monotonic()
    client.batches.cancel(batch.id)
    final = _watch(client, batch.id, timeout_s=60)
    took = time.monotonic() - t0
    rows = results(client, final)
    ids = [r["custom_id"] for r in rows]
    return {"scenario": "cancel", "status": final.status, "cancel_s": round(took, 2),
            "completed_lines": final.request_counts.completed, "output_lines": len(rows),
            "unique": len(set(ids)), "ok": final.status == "cancelled" and took < 10
            and len(set(ids)) == len(ids) == final.request_counts.completed + final.request_counts.failed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=10_000, help="lines of the faults batch")
    ap.add_argument("--ttft-s", type=float, default=15.0)
    ap.add_argument("--ttft-concurrency", type=int, default=4)
    ap.add_argument("--ttft-rounds", type=int, default=3, help="alone/beside pairs, taken in turn")
    ap.add_argument("--ttft-batch-lines", type=int, default=10_000)
    ap.add_argument("--throughput-requests", type=int, default=600)
    ap.add_argument("--cache-groups", type=int, default=20)
    ap.add_argument("--cache-per-group", type=int, default=15)
    ap.add_argument("--only", nargs="*", choices=["throughput", "cache", "ttft", "cancel", "faults"])
    ap.add_argument("--out", default="bench_results/batch.json")
    args = ap.parse_args()
    import os

    from tests.conftest import DEMO_KEY

    os.environ["EMBER_DEMO_KEY"] = DEMO_KEY
    base, _ = start_ray_serve()
    redis = PrivateRedis()
    redis.start()
    results: list[dict] = []
    try:
        from ray import serve

        from cluster.builder import build_app

        serve.run(build_app(config(redis.url)), name="batchbench", route_prefix="/batchbench")
        app = App("batchbench", f"{base}/batchbench/v1", config(redis.url))
        plan = [("throughput", lambda: scenario_throughput(app, args.throughput_requests)),
                ("cache", lambda: scenario_cache(app, args.cache_groups, args.cache_per_group)),
                ("ttft", lambda: scenario_ttft(app, args.ttft_s, args.ttft_concurrency, args.ttft_rounds,
                                                      args.ttft_batch_lines)),
                ("cancel", lambda: scenario_cancel(app)),
                ("faults", lambda: scenario_faults(app, args.lines))]
        for name, run in plan:
            if args.only and name not in args.only:
                continue
            print(f"== {name}", flush=True)
            try:
                results.append(run())
            except Exception as exc:  # one broken scenario must not lose the others' numbers
                results.append({"scenario": name, "error": repr(exc), "ok": False})
            print(results[-1], flush=True)
    finally:
        redis.cleanup()
        stop_ray_serve()
    table = []
    for r in results:
        s = r["scenario"]
        if "error" in r:
            table.append([s, "-", f"error: {r['error'][:80]}", "-", False])
        elif s == "faults":
            table.append([s, f"{r['lines']} lines, killed {', '.join(r['killed'])}",
                          f"lost {r['lost']}, twice {r['twice']}, ledger {r['ledger_events']}/{r['lines']}",
                          "0 lost, 0 twice, ledger == lines", r["ok"]])
        elif s == "ttft":
            table.append([s, f"p99 {r['alone']['ttft_ms']['p99']:.1f} ms alone",
                          f"{r['with_batch']['ttft_ms']['p99']:.1f} ms with batch ({r['p99_ratio']}x; p50 {r['p50_ratio']}x)", "<= 1.1x",
                          r["ok"]])
        elif s == "throughput":
            table.append([s, f"{r['interactive_rps']} req/s interactive", f"{r['batch_rps']} req/s batch "
                          f"({r['ratio']}x)", ">= 0.9x", r["ok"]])
        elif s == "cache":
            table.append([s, f"oracle share {r['oracle_share']}", f"batch share {r['cached_share']} ({r['ratio']}x)",
                          ">= 0.9x", r["ok"]])
        elif s == "cancel":
            table.append([s, f"{r['completed_lines']} lines done", f"cancelled in {r['cancel_s']} s", "< 10 s",
                          r["ok"]])
    print_table(["scenario", "baseline", "measured", "goal", "met"], table)
    path = write_json(args.out, {"machine": machine_info(), "args": vars(args), "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

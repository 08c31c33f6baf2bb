"""Soak: the sim pool at 80% of its capacity for 10 minutes, 10% of clients leaving at random moments.

    python tests/benchmarks/soak.py [--minutes 10] [--out bench_results/soak.json]

Two accounts share the pool. The steady account's clients always read their answers to the end, so
its ledger total must equal the sum of the usage its clients saw, exactly. The flaky account's
clients (10% of all) leave at a random moment; they must never be billed more than once, and never
less than what they received. It reports the RSS of the ingress and pool replicas every 30 s
(growth over the last 8 minutes must stay under 10%) and every error status (only 429/503 may
appear, and only under overload).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402

from tests.benchmarks._common import machine_info, print_table, start_ray_serve, stop_ray_serve, write_json  # noqa: E402
from tests.faults.drivers import chat_body, usage_totals  # noqa: E402
from tests.faults.harness import FAULT_MODEL, App, fault_config  # noqa: E402

ADMIN = "soak-admin-token"
SLOTS = 16  # 2 replicas x 8 sequences
CLIENTS = int(SLOTS * 0.8)


def serve_rss_mb() -> dict[str, float]:
    import psutil

    out: dict[str, float] = {}
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ServeReplica:soak" in cmd:
            role = "ingress" if ":ingress" in cmd else "pool"
            out[role] = out.get(role, 0.0) + p.info["memory_info"].rss / 2**20
    return out


async def client_loop(client: httpx.AsyncClient, base: str, key: str, flaky: bool, end: float, seed: int,
                      stats: dict) -> None:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {key}"}
    while time.monotonic() < end:
        stream = rng.random() < 0.5
        body = chat_body(FAULT_MODEL, stream=stream, max_tokens=rng.randint(20, 120),
                         text=f"soak {rng.randrange(10**6)}")
        leave = rng.uniform(0.0, 1.5) if flaky else None
        try:
            async with asyncio.timeout(leave) if leave else asyncio.timeout(60):
                await one(client, base, headers, body, stats)
        except TimeoutError:
            stats["left" if flaky else "hung"] += 1


async def one(client, base, headers, body, stats) -> None:
    if not body["stream"]:
        r = await client.post(base + "/chat/completions", json=body, headers=headers)
        if r.status_code != 200:
            stats[f"status_{r.status_code}"] += 1
            return
        u = r.json()["usage"]
        stats["completed"] += 1
        stats["prompt"] += u["prompt_tokens"]
        stats["completion"] += u["completion_tokens"]
        return
    async with client.stream("POST", base + "/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            stats[f"status_{r.status_code}"] += 1
            return
        usage = None
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                if '"error"' in line[:20]:
                    stats["stream_error"] += 1
                    return
                if '"usage"' in line:
                    import json

                    usage = json.loads(line[6:]).get("usage") or usage
        if usage is None:
            stats["no_usage"] += 1
            return
        stats["completed"] += 1
        stats["prompt"] += usage["prompt_tokens"]
        stats["completion"] += usage["completion_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--out", default="bench_results/soak.json")
    args = ap.parse_args()
    os.environ["EMBER_ADMIN_TOKEN"] = ADMIN
    os.environ["EMBER_DEMO_KEY"] = "soak-steady-key"
    base, _ = start_ray_serve()
    from ray import serve

    from cluster.builder import build_app

    cfg = fault_config(replicas=2, seqs=8)
    cfg["models"][0]["engine"]["latency"] = {"step_base_s": 0.008, "prefill_base_s": 0.004,
                                             "decode_s_per_seq": 0.0002}
    serve.run(build_app(cfg), name="soak", route_prefix="/soak")
    app = App("soak", f"{base}/soak/v1", cfg)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    httpx.post(f"{base}/soak/admin/accounts", json={"id": "flaky"}, headers=admin, timeout=30).raise_for_status()
    flaky_key = httpx.post(f"{base}/soak/admin/accounts/flaky/keys", headers=admin, timeout=30).json()["key"]

    steady, flaky = Counter(), Counter()
    rss: list[dict] = []
    duration = args.minutes * 60

    async def run() -> None:
        end = time.monotonic() + duration
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            n_flaky = max(1, round(CLIENTS * 0.1))
            tasks = [asyncio.create_task(client_loop(client, app.base, "soak-steady-key", False, end, i, steady))
                     for i in range(CLIENTS - n_flaky)]
            tasks += [asyncio.create_task(client_loop(client, app.base, flaky_key, True, end, 1000 + i, flaky))
                      for i in range(n_flaky)]
            t0 = time.monotonic()
            while time.monotonic() < end:
                await asyncio.sleep(30)
                rss.append({"t_s": round(time.monotonic() - t0), **serve_rss_mb()})
                print(rss[-1], dict(steady), flush=True)
            await asyncio.gather(*tasks)

    try:
        asyncio.run(run())
        app.wait_idle(timeout_s=60)
        gate = app.gate()
        steady_ledger = usage_totals(app.base, "soak-steady-key")
        flaky_ledger = usage_totals(app.base, flaky_key)
    finally:
        stop_ray_serve()
    window = [r for r in rss if r["t_s"] >= duration - 8 * 60] or rss
    growth = {role: (window[-1][role] - window[0][role]) / window[0][role] for role in ("ingress", "pool")
              if role in window[0] and role in window[-1]}
    bad = {k: v for k, v in {**steady, **{f"flaky_{k}": v for k, v in flaky.items()}}.items()
           if k.startswith(("status_", "flaky_status_", "stream_error", "no_usage", "hung", "flaky_hung"))
           and not k.endswith(("429", "503"))}
    result = {
        "minutes": args.minutes, "clients": CLIENTS, "slots": SLOTS,
        "steady_client": dict(steady), "flaky_client": dict(flaky),
        "steady_ledger": steady_ledger, "flaky_ledger": flaky_ledger,
        "ledger_equals_clients": (steady_ledger.get("requests") == steady["completed"]
                                  and steady_ledger.get("completion_tokens") == steady["completion"]
                                  and steady_ledger.get("prompt_tokens") == steady["prompt"]),
        "gate_after": gate, "rss_mb": rss, "rss_growth_last_8_min": growth, "errors_other_than_429_503": bad,
    }
    print_table(["measure", "value", "goal"], [
        ["steady requests completed", steady["completed"], ""],
        ["steady ledger == client sum", result["ledger_equals_clients"], "True"],
        ["flaky clients left / completed", f"{flaky['left']} / {flaky['completed']}", ""],
        ["flaky billed requests (<= sent)", flaky_ledger.get("requests", 0), ""],
        ["RSS growth ingress (last 8 min)", f"{growth.get('ingress', 0):+.1%}", "< 10%"],
        ["RSS growth pool (last 8 min)", f"{growth.get('pool', 0):+.1%}", "< 10%"],
        ["errors other than 429/503", sum(bad.values()), "0"],
        ["gate in flight when idle", gate["in_flight"], "0"],
    ])
    print(f"wrote {write_json(args.out, {'machine': machine_info(), **result})}")


if __name__ == "__main__":
    main()

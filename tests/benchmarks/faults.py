"""Fault table: each fault of the request lifecycle, at scale, with what clients saw and what was billed.

    python tests/benchmarks/faults.py [--disconnects 2000] [--out bench_results/faults.json]

For each fault it prints: requests sent, completed, clean OpenAI-shaped errors, clients that left
on purpose, hung (no answer within the client deadline), usage events written against the
requests whose clients saw output (every one of those must be billed; none twice), and the seconds
until full capacity was back (gate empty, engines idle, fresh requests all 200).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.benchmarks._common import machine_info, print_table, start_ray_serve, stop_ray_serve, write_json  # noqa: E402
from tests.faults.drivers import PHASES, Tally, chat_body, fresh, storm, usage_totals  # noqa: E402
from tests.faults.harness import AUTH, FAULT_MODEL, App, PrivateRedis, fault_config  # noqa: E402


def deploy(base_url: str, name: str, config: dict) -> App:
    from ray import serve

    from cluster.builder import build_app

    serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    return App(name, f"{base_url}/{name}/v1", config)


def capacity_back_s(app: App, t0: float, replicas: int) -> tuple[float, int]:
    """(seconds from ``t0`` until every replica of the pool answers again, requests billed by the
    8-request probe sent afterwards).

    Then, untimed: the gate drains to empty, no engine holds a request, fresh requests all pass.
    """
    # The gate's own view: the pool's router publishes its running replicas, the gate's slots
    # follow. (Probing the replicas by session key cannot tell: a busy one is routed around.)
    saw_fewer = False
    while True:
        live = app.gate()["replicas"]
        saw_fewer = saw_fewer or live < replicas
        if live >= replicas and (saw_fewer or time.monotonic() - t0 > 3):
            break
        if time.monotonic() - t0 > 120:
            return float("inf"), 0
        time.sleep(0.05)
    back = time.monotonic() - t0
    gate = app.wait_idle(timeout_s=60)
    assert gate["in_flight"] == 0 and gate["waiting"] == 0, gate
    assert not any(app.pool_stats().values()), "an engine still holds a request"
    probe = asyncio.run(fresh(app.base, FAULT_MODEL, n=8))
    assert probe.outcomes == {"completed": 8}, probe.outcomes
    return back, probe.saw_output


def row(name: str, tally: Tally, events: int, back_s: float, note: str = "") -> dict:
    o = tally.outcomes
    return {"fault": name, "sent": sum(o.values()), "completed": o["completed"], "clean_errors": o["error"],
            "left": o["left"], "hung": o["hung"], "usage_events": events, "clients_saw_output": tally.saw_output,
            "billed_ok": tally.saw_output <= events <= sum(o.values()), "capacity_back_s": round(back_s, 2),
            "note": note}


def scenario_disconnects(base: str, n: int) -> dict:
    app = deploy(base, "f-disconnect", fault_config(seqs=8))
    tally = asyncio.run(storm(app.base, FAULT_MODEL, n=n, concurrency=48, seed=7))
    t0 = time.monotonic()
    back, probes = capacity_back_s(app, t0, 2)
    events = usage_totals(app.base).get("requests", 0) - probes
    return row(f"{n} disconnects over {len(PHASES)} phases", tally, events, back,
               "phases: " + ", ".join(PHASES))


def scenario_gate_waiters(base: str, n: int = 300) -> dict:
    app = deploy(base, "f-gate", fault_config(replicas=1, seqs=2))
    tally = asyncio.run(storm(app.base, FAULT_MODEL, n=n, concurrency=40, seed=11, phases=("queued",)))
    back, probes = capacity_back_s(app, time.monotonic(), 1)
    events = usage_totals(app.base).get("requests", 0) - probes
    return row(f"{n} waiters cancelled in the gate queue", tally, events, back, "two slots, 40 clients")


def scenario_timeout(base: str) -> dict:
    import httpx

    app = deploy(base, "f-timeout", fault_config(replicas=1, seqs=1, request_timeout_s=1.0))
    tally = Tally()
    r = httpx.post(app.base + "/chat/completions", headers=AUTH, timeout=60,
                   json=chat_body(FAULT_MODEL, stream=False, max_tokens=1500))
    tally.add("504", "error" if r.status_code == 504 and "error" in r.json() else "completed")
    t0 = time.monotonic()
    with httpx.stream("POST", app.base + "/chat/completions", headers=AUTH, timeout=60,
                      json=chat_body(FAULT_MODEL, stream=True, max_tokens=4)) as s:
        lines = s.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        next_ttft = time.monotonic() - t0
        for _ in lines:
            pass
    tally.add("next", "completed")
    tally.saw_output = 1
    events = usage_totals(app.base).get("requests", 0)
    tally.saw_output = events  # the 504'd request ran: it is billed for its prompt and tokens
    return {**row("504 on a long generation", tally, events, next_ttft),
            "note": f"next request on that one-sequence replica: first token after {next_ttft:.3f} s"}


def _busy_replica(app: App) -> str:
    while True:
        busy = [r for r, n in app.pool_stats().items() if n]
        if busy:
            return busy[0]
        time.sleep(0.02)


def scenario_kill_before_first_token(base: str, n: int = 6) -> dict:
    import concurrent.futures

    import httpx

    cfg = fault_config(replicas=2, seqs=8)
    # The sim charges each admitted request's prefill to the step: 1 s each, so a few requests
    # sit before their first token for seconds.
    cfg["models"][0]["engine"]["latency"] = {"prefill_base_s": 1.0, "step_base_s": 0.01}
    app = deploy(base, "f-killfirst", cfg)
    tally = Tally()

    def call() -> int:
        return httpx.post(app.base + "/chat/completions", headers=AUTH, timeout=60,
                          json=chat_body(FAULT_MODEL, stream=False, max_tokens=4)).status_code

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(call) for _ in range(n)]
        victim = _busy_replica(app)
        t0 = time.monotonic()
        app.kill_replica(victim)
        for f in futures:
            tally.add("kill", "completed" if f.result() == 200 else "error")
    tally.saw_output = tally.outcomes["completed"]
    back, probes = capacity_back_s(app, t0, 2)
    events = usage_totals(app.base).get("requests", 0) - probes
    return row("replica killed before the first token", tally, events, back,
               "retried once on another replica")


def scenario_kill_mid_stream(base: str, n: int = 12) -> dict:
    import concurrent.futures

    import httpx

    app = deploy(base, "f-killmid", fault_config(replicas=2, seqs=8))
    tally = Tally()
    started = concurrent.futures.Future()

    def stream() -> tuple[str, int]:
        seen = 0
        with httpx.stream("POST", app.base + "/chat/completions", headers=AUTH, timeout=60,
                          json=chat_body(FAULT_MODEL, stream=True, max_tokens=600)) as r:
            last = ""
            for line in r.iter_lines():
                if line.startswith("data: "):
                    last = line
                    if '"choices":[{' in line:
                        seen += 1
                        if not started.done():
                            started.set_result(True)
        return last, seen

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(stream) for _ in range(n)]
        started.result(timeout=30)
        time.sleep(0.3)
        t0 = time.monotonic()
        app.kill_replica(_busy_replica(app))
        for f in futures:
            last, seen = f.result()
            tally.saw_output += 1
            tally.tokens_seen += seen
            if "[DONE]" in last:
                tally.add("kill", "completed")
            elif '"error"' in last:
                tally.add("kill", "error")
            else:
                tally.add("kill", "hung")
    back, probes = capacity_back_s(app, t0, 2)
    events = usage_totals(app.base).get("requests", 0) - probes
    return row("replica killed mid-stream", tally, events, back,
               "streams on the killed replica end with an error event")


def _limited(store: str) -> dict:
    cfg = fault_config(store=store, replicas=1)
    limit = 3000
    cfg["models"][0]["limits"] = {"floor": {"prompt": limit, "uncached": limit, "generated": limit},
                                  "ceiling": {"prompt": limit, "uncached": limit, "generated": limit}}
    cfg["rate_limit"] = {"enabled": True, "lease_fraction": 0.02}
    return cfg


def scenario_limiter_kill(base: str, store_name: str, redis: PrivateRedis) -> dict:
    import httpx
    import ray

    from cluster.config import EmberConfig
    from policies.consistent_hash import stable_hash

    cfg = _limited("memory://" if store_name == "memory" else redis.url)
    app = deploy(base, f"f-limkill-{store_name}", cfg)
    body = chat_body(FAULT_MODEL, stream=False, max_tokens=4, text="Count the tokens in this message. " * 4)
    tally = Tally()
    for _ in range(200):
        r = httpx.post(app.base + "/chat/completions", headers=AUTH, json=body, timeout=60)
        if r.status_code == 429:
            break
        prompt = r.json()["usage"]["prompt_tokens"]
        tally.saw_output += 1
        tally.add("fill", "completed")
    limited_at = time.monotonic()
    config = EmberConfig.model_validate(cfg)
    digest = stable_hash(config.rate_limit.model_dump_json() + config.store.url)
    ray.kill(ray.get_actor(f"ember-ratelimit-{digest:016x}-0", namespace="ember"), no_restart=False)
    time.sleep(1.5)  # past the ingress's memory of its last refusal: the next request asks the actor
    # After the restart, send until refused again: a reset limit admits a full bucket (~60 of
    # these requests); a kept one only what refilled since the limit was hit.
    admitted_after = 0
    for _ in range(100):
        r = httpx.post(app.base + "/chat/completions", headers=AUTH, json=body, timeout=60)
        if r.status_code != 200:
            tally.add("after", "error")
            break
        admitted_after += 1
        tally.saw_output += 1
        tally.add("after", "completed")
    refill = (time.monotonic() - limited_at) * 3000 / 60 / prompt
    events = usage_totals(app.base).get("requests", 0)
    return row(f"limiter killed at the limit ({store_name}://)", tally, events, 0.0,
               f"after the restart {admitted_after} admitted before the next 429; the bucket refilled "
               f"~{refill:.1f} requests' worth meanwhile (a reset would admit ~{3000 // prompt})")


def scenario_redis_outage(base: str, redis: PrivateRedis, kill_ingress: bool) -> dict:
    outbox = tempfile.mkdtemp(prefix="ember-outbox-")
    name = "f-redis-ingress" if kill_ingress else "f-redis"
    app = deploy(base, name, fault_config(store=redis.url, replicas=2, seqs=8, outbox_dir=outbox))
    before = usage_totals(app.base).get("requests", 0)  # earlier scenarios share this Redis

    async def load(seconds: float) -> Tally:
        tally = Tally()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = await fresh(app.base, FAULT_MODEL, n=16)
            tally.outcomes.update(t.outcomes)
            tally.saw_output += t.saw_output
        return tally

    async def run() -> Tally:
        task = asyncio.create_task(load(12.0))
        await asyncio.sleep(3)
        redis.stop()
        await asyncio.sleep(4)
        if kill_ingress:
            await app.ingress().flush_usage.remote(0.2)
            app.kill_ingress()
        await asyncio.sleep(1)
        redis.start()
        return await task

    tally = asyncio.run(run())
    t0 = time.monotonic()
    events = 0
    while time.monotonic() - t0 < 90:
        try:
            events = usage_totals(app.base).get("requests", 0) - before
        except Exception:
            events = 0
        if events >= tally.saw_output:
            break
        time.sleep(0.5)
    back = time.monotonic() - t0
    what = "Redis stopped 5 s under load" + (", ingress killed with usage pending" if kill_ingress else "")
    return row(what, tally, events, back, "capacity_back_s here: seconds until every usage event was in the ledger")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--disconnects", type=int, default=2000)
    ap.add_argument("--only", type=int, nargs="*", help="run only these scenarios (0-based)")
    ap.add_argument("--out", default="bench_results/faults.json")
    args = ap.parse_args()
    import os

    from tests.conftest import DEMO_KEY

    os.environ["EMBER_DEMO_KEY"] = DEMO_KEY  # read when each app is built
    base, _ = start_ray_serve()
    redis = PrivateRedis()
    redis.start()
    rows = []
    scenarios = [
        lambda: scenario_disconnects(base, args.disconnects),
        lambda: scenario_gate_waiters(base),
        lambda: scenario_timeout(base),
        lambda: scenario_kill_before_first_token(base),
        lambda: scenario_kill_mid_stream(base),
        lambda: scenario_limiter_kill(base, "memory", redis),
        lambda: scenario_limiter_kill(base, "redis", redis),
        lambda: scenario_redis_outage(base, redis, kill_ingress=False),
        lambda: scenario_redis_outage(base, redis, kill_ingress=True),
    ]
    try:
        for i, scenario in enumerate(scenarios):
            if args.only and i not in args.only:
                continue
            rows.append(scenario())
            print(rows[-1], flush=True)
    finally:
        redis.cleanup()
        stop_ray_serve()
    headers = ["fault", "sent", "completed", "clean_errors", "left", "hung", "usage_events", "clients_saw_output",
               "billed_ok", "capacity_back_s"]
    print_table(headers, [[r[h] for h in headers] for r in rows])
    for r in rows:
        if r["note"]:
            print(f"- {r['fault']}: {r['note']}")
    path = write_json(args.out, {"machine": machine_info(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

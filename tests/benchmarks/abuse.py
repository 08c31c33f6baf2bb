"""One tenant attacks, the others must not notice: the goals of Ember's admission and tenant limits.

    python tests/benchmarks/abuse.py [--seconds 20] [--out bench_results/abuse.json]

Scenarios, each measured side by side in one run:
- slow bodies: a victim account's p99 latency alone, then while an attacker key holds hundreds of
  connections that trickle their bodies;
- 2 MiB floods: the same, while an attacker that is already rate-limited floods 2 MiB bodies;
- generated-token burst: tokens admitted in a minute under concurrent ``n: 8, max_tokens: 4000``
  requests (and ``n: 2, max_tokens: 2000``) against a 20,000 generated-tokens-a-minute limit;
- cross-account probes: another tenant's models, account, usage and prompt cache;
- revocation on 4 ingress replicas (Redis): requests accepted more than 1 s after a revoke;
- Retry-After on 4 ingress replicas: a lone client that waits its Retry-After is admitted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402

from tests.benchmarks._common import (  # noqa: E402
    machine_info, percentile, print_table, start_ray_serve, stop_ray_serve, write_json,
)
from tests.faults.harness import PrivateRedis  # noqa: E402

ADMIN = "abuse-admin-token"
DEMO = "abuse-demo-key"
MODEL = "accounts/ember/models/shared"
PRIVATE = "accounts/acme/models/private"
LIMITED = "accounts/ember/models/metered"


def app_config(store: str = "memory://", ingress_replicas: int = 1, rpm: int = 6000) -> dict:
    sim = {"kind": "sim", "block_size": 32, "max_num_seqs": 16,
           "latency": {"step_base_s": 0.004, "prefill_base_s": 0.002, "prefill_s_per_token": 0.00001}}
    tight = {"prompt": 20_000, "uncached": 20_000, "generated": 20_000}
    big = {"prompt": 50_000_000, "uncached": 50_000_000, "generated": 50_000_000}
    return {
        "models": [
            {"id": MODEL, "context_length": 4096, "num_replicas": 1, "resources": {"num_cpus": 0.1}, "engine": sim,
             "limits": {"floor": big, "ceiling": big}},
            {"id": LIMITED, "context_length": 8192, "num_replicas": 1, "resources": {"num_cpus": 0.05},
             "engine": sim, "limits": {"floor": tight, "ceiling": tight}},
            {"id": PRIVATE, "context_length": 1024, "num_replicas": 1, "resources": {"num_cpus": 0.05},
             "engine": {"kind": "sim", "block_size": 32}},
        ],
        "ingress": {"num_replicas": ingress_replicas, "num_cpus": 0.1, "access_log": False,
                    "max_completion_tokens": 4000},
        "store": {"url": store},
        "rate_limit": {"enabled": True, "requests_per_minute": rpm},
    }


def deploy(base: str, name: str, config: dict) -> str:
    from ray import serve

    from cluster.builder import build_app

    serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    return f"{base}/{name}"


def new_key(app: str, account: str) -> str:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    httpx.post(app + "/admin/accounts", json={"id": account}, headers=admin, timeout=30)
    return httpx.post(f"{app}/admin/accounts/{account}/keys", headers=admin, timeout=30).json()["key"]


async def victim_p99_ms(app: str, key: str, seconds: float, clients: int = 4) -> dict:
    lat: list[float] = []
    errors = 0
    kinds: dict[str, int] = {}  # "status code" of each error, to say what the victim saw
    end = time.monotonic() + seconds
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}
    async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {key}"}) as c:
        async def loop():
            nonlocal errors
            while time.monotonic() < end:
                t = time.perf_counter()
                r = await c.post(app + "/v1/chat/completions", json=body)
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t)
                else:
                    errors += 1
                    try:
                        code = r.json()["error"]["code"]
                    except Exception:
                        code = r.text[:60]
                    kinds[f"{r.status_code} {code}"] = kinds.get(f"{r.status_code} {code}", 0) + 1

        await asyncio.gather(*(loop() for _ in range(clients)))
    lat.sort()
    return {"requests": len(lat), "errors": errors, "error_kinds": kinds, "p50_ms": percentile(lat, 50) * 1000,
            "p99_ms": percentile(lat, 99) * 1000}


async def slow_bodies(app: str, key: str, seconds: float, connections: int, backoff: bool = False) -> dict:
    """``connections`` sockets that send headers, then one byte a second; reopened when closed
    (at once, or with ``backoff`` after the 1 s a refusal's Retry-After asks for)."""
    u = urlsplit(app)
    stats = {"opened": 0, "closed_by_server": 0}
    end = time.monotonic() + seconds

    async def one():
        while time.monotonic() < end:
            try:
                reader, writer = await asyncio.open_connection(u.hostname, u.port)
            except OSError:
                await asyncio.sleep(0.5)
                continue
            stats["opened"] += 1
            writer.write((f"POST {u.path}/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                          "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{").encode())
            try:
                while time.monotonic() < end:
                    await writer.drain()
                    try:
                        data = await asyncio.wait_for(reader.read(1024), 1.0)
                        if data or reader.at_eof():
                            stats["closed_by_server"] += 1
                            break
                    except TimeoutError:
                        writer.write(b" ")
            except (ConnectionError, OSError):
                stats["closed_by_server"] += 1
            finally:
                writer.close()
            if backoff:
                await asyncio.sleep(1.0)

    await asyncio.gather(*(one() for _ in range(connections)))
    return stats


async def flood(app: str, key: str, seconds: float, concurrency: int = 8) -> dict:
    """A limited account sending 2 MiB bodies (~70k messages) as fast as it can."""
    one = {"role": "user", "content": "spam"}
    count = (2 * 1024 * 1024 - 256) // (len(json.dumps(one)) + 2)  # as many as fit in 2 MiB
    body = json.dumps({"model": LIMITED, "messages": [one] * count, "max_tokens": 1}).encode()
    codes: dict[int, int] = {}
    end = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {key}",
                                                      "Content-Type": "application/json"}) as c:
        async def loop():
            while time.monotonic() < end:
                r = await c.post(app + "/v1/chat/completions", content=body)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return {"body_bytes": len(body), "codes": codes}


def make_limited(app: str, key: str) -> None:
    """Spend the account's prompt budget on LIMITED so that it is refused from now on."""
    long = [{"role": "user", "content": "word " * 3000}]
    for _ in range(20):
        r = httpx.post(app + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                       json={"model": LIMITED, "messages": long, "max_tokens": 1})
        if r.status_code == 429:
            return
    raise RuntimeError("the attacker never reached its limit")


async def burst(app: str, key: str, n: int, max_tokens: int, clients: int = 25) -> dict:
    body = {"model": LIMITED, "messages": [{"role": "user", "content": "go"}], "n": n, "max_tokens": max_tokens}
    async with httpx.AsyncClient(timeout=300, headers={"Authorization": f"Bearer {key}"}) as c:
        rs = await asyncio.gather(*(c.post(app + "/v1/chat/completions", json=body) for _ in range(clients)))
    ok = [r.json()["usage"]["completion_tokens"] for r in rs if r.status_code == 200]
    return {"sent": clients, "admitted": len(ok), "generated_tokens": sum(ok), "reservation": n * max_tokens,
            "refused_429": sum(r.status_code == 429 for r in rs)}


def probes(app: str, demo: str, acme: str) -> dict:
    """Every way the demo account could reach acme's data; each must be 404 or 401."""
    d = {"Authorization": f"Bearer {demo}"}
    results = {}
    msg = [{"role": "user", "content": "x"}]
    results["list private model"] = "hidden" if PRIVATE not in [m["id"] for m in httpx.get(
        app + "/v1/models", headers=d, timeout=30).json()["data"]] else "VISIBLE"
    results["call private model"] = httpx.post(app + "/v1/chat/completions", headers=d, timeout=30,
                                               json={"model": PRIVATE, "messages": msg, "max_tokens": 1}).status_code
    results["read acme's account"] = httpx.get(app + "/v1/accounts/acme", headers=d, timeout=30).status_code
    results["admin API with a tenant key"] = httpx.get(app + "/admin/accounts/acme/keys", headers=d,
                                                       timeout=30).status_code
    usage = httpx.get(app + "/v1/usage", headers=d, timeout=30).json()
    results["usage shows only own account"] = "own" if usage["account"] == "demo" else "LEAK"
    shared = [{"role": "user", "content": "the same long system prompt " * 40}]
    for key in (acme, demo):
        r = httpx.post(app + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                       json={"model": MODEL, "messages": shared, "max_tokens": 1})
    results["demo's cache hit on acme's prompt (tokens)"] = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    ok = (results["list private model"] == "hidden" and results["call private model"] == 404
          and results["read acme's account"] == 404 and results["admin API with a tenant key"] == 401
          and results["usage shows only own account"] == "own"
          and results["demo's cache hit on acme's prompt (tokens)"] == 0)
    return {"probes": results, "violations": 0 if ok else 1}


async def revocation(app: str, key_id: str, key: str, seconds: float = 4.0) -> dict:
    """Revoke, then keep calling (spread over the ingress replicas): accepted after 1 s must be 0."""
    h = {"Authorization": f"Bearer {key}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as c:
        for _ in range(16):  # every replica caches the key
            await c.post(app + "/v1/chat/completions", json=body, headers=h)
        t0 = time.monotonic()
        r = await c.delete(f"{app}/admin/keys/{key_id}", headers={"Authorization": f"Bearer {ADMIN}"})
        r.raise_for_status()
        late, last_ok = 0, 0.0
        while time.monotonic() - t0 < seconds:
            rr = await c.post(app + "/v1/chat/completions", json=body, headers=h)
            if rr.status_code == 200:
                last_ok = time.monotonic() - t0
                late += last_ok > 1.0
    return {"accepted_after_1s": late, "last_accepted_s": round(last_ok, 3)}


def retry_after(app: str, key: str, tries: int = 8) -> dict:
    body = {"model": LIMITED, "messages": [{"role": "user", "content": "word " * 2500}], "max_tokens": 1}
    h = {"Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as c:
        while c.post(app + "/v1/chat/completions", json=body, headers=h).status_code != 429:
            pass
        admitted = refused = 0
        for _ in range(tries):
            r = c.post(app + "/v1/chat/completions", json=body, headers=h)
            while r.status_code == 200:  # spend again until refused, then honour the hint
                r = c.post(app + "/v1/chat/completions", json=body, headers=h)
            time.sleep(int(r.headers["retry-after"]))
            again = c.post(app + "/v1/chat/completions", json=body, headers=h)
            admitted += again.status_code == 200
            refused += again.status_code == 429
    return {"tries": tries, "admitted_after_waiting": admitted, "refused_after_waiting": refused}


ATTACKS = ("slow_bodies", "slow_bodies_backoff", "flood_2mib")


def attack(kind: str, app: str, key: str, seconds: float, connections: int):
    if kind == "flood_2mib":
        return flood(app, key, seconds)
    return slow_bodies(app, key, seconds, connections, backoff=kind == "slow_bodies_backoff")


def _attacker_process(kind: str, app: str, key: str, seconds: float, connections: int, started, results) -> None:
    started.set()
    results.put(asyncio.run(attack(kind, app, key, seconds, connections)))


def latency_scenarios(app: str, victim: str, attacker: str, args, mode: str) -> dict:
    """The victim's latency alone, then under each attack. ``mode`` says where the attacker's
    client runs:

    - ``in_process``: on this process's event loop, beside the victim's client (the strict
      reading: the attacker's client work, 2 MiB bodies or hundreds of sockets, delays the victim's
      own client too, which a victim on another machine would not suffer);
    - ``process``: in its own process on the same cores (what the goal means: another tenant's
      client, which still competes for this machine's two cores).
    """
    import multiprocessing

    result = {"alone": asyncio.run(victim_p99_ms(app, victim, args.seconds))}
    for kind in ATTACKS:
        if kind == "flood_2mib":
            make_limited(app, attacker)
        if mode == "in_process":
            async def under():
                return await asyncio.gather(victim_p99_ms(app, victim, args.seconds),
                                            attack(kind, app, attacker, args.seconds + 2, args.slow_connections))
            v, a = asyncio.run(under())
        else:
            ctx = multiprocessing.get_context("spawn")
            started, results = ctx.Event(), ctx.Queue()
            proc = ctx.Process(target=_attacker_process, args=(kind, app, attacker, args.seconds + 3,
                                                               args.slow_connections, started, results))
            proc.start()
            started.wait(60)
            time.sleep(1.0)  # the attack's connections open
            v = asyncio.run(victim_p99_ms(app, victim, args.seconds))
            a = results.get(timeout=120)
            proc.join(30)
        result[kind] = {**v, "attack": a}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--slow-connections", type=int, default=300)
    ap.add_argument("--latency-only", action="store_true", help="only the two latency scenarios")
    ap.add_argument("--attacker", nargs="+", choices=("in_process", "process"), default=["process", "in_process"],
                    help="where the attacker's client runs (see latency_scenarios); each is measured")
    ap.add_argument("--out", default="bench_results/abuse.json")
    args = ap.parse_args()
    os.environ["EMBER_ADMIN_TOKEN"] = ADMIN
    os.environ["EMBER_DEMO_KEY"] = DEMO
    base, _ = start_ray_serve()
    redis = PrivateRedis()
    redis.start()
    out: dict = {"machine": machine_info()}
    try:
        # The victim (~30 requests/s alone) must stay under its own RPM cap: its errors and latency
        # are the attack's, not its limit's.
        app = deploy(base, "abuse", app_config(rpm=6000))
        victim, attacker, acme = new_key(app, "victim"), new_key(app, "attacker"), new_key(app, "acme")
        asyncio.run(victim_p99_ms(app, victim, 3))  # warm up
        out["latency"] = {mode: latency_scenarios(app, victim, attacker, args, mode) for mode in args.attacker}
        if args.latency_only:
            return _report(out, args)
        out["burst"] = {
            "n8_max4000": asyncio.run(burst(app, new_key(app, "burst-a"), 8, 4000)),
            "n2_max2000": asyncio.run(burst(app, new_key(app, "burst-b"), 2, 2000)),
        }
        out["cross_account"] = probes(app, DEMO, acme)

        app4 = deploy(base, "abuse4", app_config(store=redis.url, ingress_replicas=4))
        key = httpx.post(app4 + "/admin/accounts", json={"id": "leaver"}, timeout=30,
                         headers={"Authorization": f"Bearer {ADMIN}"})
        made = httpx.post(app4 + "/admin/accounts/leaver/keys", headers={"Authorization": f"Bearer {ADMIN}"},
                          timeout=30).json()
        out["revocation"] = asyncio.run(revocation(app4, made["id"], made["key"]))
        out["retry_after"] = retry_after(app4, new_key(app4, "patient"))
        del key
    finally:
        redis.cleanup()
        stop_ray_serve()
    _report(out, args)


def _report(out: dict, args) -> None:
    rows = []
    for mode, lat in out["latency"].items():
        alone = lat["alone"]["p99_ms"]
        rows.append([f"[attacker {mode}] victim p99 alone", f"{alone:.1f} ms", ""])
        for kind, label in (("slow_bodies", f"{args.slow_connections} slow bodies"),
                            ("slow_bodies_backoff", f"{args.slow_connections} slow bodies that back off 1 s"),
                            ("flood_2mib", "2 MiB flood (limited attacker)")):
            p99 = lat[kind]["p99_ms"]
            rows.append([f"[attacker {mode}] victim p99 under {label}", f"{p99:.1f} ms ({p99 / alone:.2f}x)",
                         "<= 1.5x"])
        rows.append([f"[attacker {mode}] victim errors under attack",
                     sum(lat[k]["errors"] for k in ATTACKS), "0"])
    if "burst" not in out:
        print_table(["measure", "value", "goal"], rows)
        print(f"wrote {write_json(args.out, out)}")
        return
    for name, b in out["burst"].items():
        rows.append([f"generated tokens admitted, burst {name}", f"{b['generated_tokens']} ({b['admitted']} of "
                     f"{b['sent']} admitted)", f"<= 20000 + {b['reservation']}"])
    rows += [
        ["cross-account probes violated", out["cross_account"]["violations"], "0"],
        ["revoked key accepted after 1 s (4 ingress)", out["revocation"]["accepted_after_1s"], "0"],
        ["Retry-After honoured (4 ingress)", f"{out['retry_after']['admitted_after_waiting']} of "
         f"{out['retry_after']['tries']}", "all"],
    ]
    print_table(["measure", "value", "goal"], rows)
    print(f"wrote {write_json(args.out, out)}")


if __name__ == "__main__":
    main()

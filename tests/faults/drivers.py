"""Clients that misbehave on purpose, shared by the fault tests and ``tests/benchmarks/faults.py``.

Each client request ends in one of: ``completed`` (a full answer), ``error`` (a clean,
OpenAI-shaped error: status + JSON body, or an error event in a stream), ``left`` (the client
walked away on purpose), or ``hung`` (no answer within the client's deadline). A disconnect is
a closed TCP connection, never a polite request.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from tests.conftest import DEMO_KEY

PHASES = ("body", "queued", "before_first_token", "mid_stream", "non_stream")
CLIENT_DEADLINE_S = 60.0


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)
    by_phase: Counter = field(default_factory=Counter)
    saw_output: int = 0  # requests whose client received at least one token
    tokens_seen: int = 0  # completion tokens the clients received (completed requests: from usage)
    completed_usage: list[dict] = field(default_factory=list)

    def add(self, phase: str, outcome: str) -> None:
        self.outcomes[outcome] += 1
        self.by_phase[(phase, outcome)] += 1


def chat_body(model: str, *, stream: bool, max_tokens: int, text: str = "tell me a story") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "stream": stream}


def _client() -> httpx.AsyncClient:
    # No keep-alive: every request has its own connection, so leaving closes it.
    return httpx.AsyncClient(timeout=CLIENT_DEADLINE_S, limits=httpx.Limits(max_keepalive_connections=0),
                             headers={"Authorization": f"Bearer {DEMO_KEY}"})


async def _partial_body(base: str, model: str) -> None:
    """Send the headers and part of the body, then close the connection."""
    u = urlsplit(base)
    body = json.dumps(chat_body(model, stream=False, max_tokens=8)).encode()
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    head = (f"POST {u.path}/chat/completions HTTP/1.1\r\nHost: {u.hostname}\r\n"
            f"Authorization: Bearer {DEMO_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) + 100}\r\n\r\n").encode()
    writer.write(head + body[: len(body) // 2])
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()


async def one_request(client: httpx.AsyncClient, base: str, model: str, phase: str, rng: random.Random,
                      tally: Tally, max_tokens: int = 60) -> None:
    if phase == "body":
        await _partial_body(base, model)
        tally.add(phase, "left")
        return
    stream = phase != "non_stream"
    body = chat_body(model, stream=stream, max_tokens=max_tokens)
    if phase in ("queued", "before_first_token", "non_stream"):
        # Leave after a random moment: queued at the gate, waiting for the first token, or half-way.
        leave_after = rng.uniform(0.0, 0.3)
        try:
            async with asyncio.timeout(leave_after):
                await _run(client, base, body, tally, phase)
        except TimeoutError:
            tally.add(phase, "left")
        return
    await _run(client, base, body, tally, phase, leave_mid_stream=True)


async def _run(client, base, body, tally: Tally, phase: str, leave_mid_stream: bool = False) -> None:
    try:
        async with asyncio.timeout(CLIENT_DEADLINE_S):
            if not body["stream"]:
                r = await client.post(base + "/chat/completions", json=body)
                _finish(r.status_code, r.json(), tally, phase)
                return
            async with client.stream("POST", base + "/chat/completions", json=body) as r:
                if r.status_code != 200:
                    _finish(r.status_code, json.loads(await r.aread()), tally, phase)
                    return
                usage, saw = None, False
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        _check_error(event)
                        tally.add(phase, "error")
                        return
                    if event.get("choices"):
                        if not saw:
                            saw = True
                            tally.saw_output += 1
                        if leave_mid_stream:
                            tally.tokens_seen += 1
                            tally.add(phase, "left")
                            return  # leaving the block closes the connection mid-stream
                    usage = event.get("usage") or usage
                if usage is None:
                    tally.add(phase, "error")
                    return
                tally.tokens_seen += usage["completion_tokens"]
                tally.completed_usage.append(usage)
                tally.add(phase, "completed")
    except TimeoutError:
        tally.add(phase, "hung")


def _finish(status: int, body: dict, tally: Tally, phase: str) -> None:
    if status == 200:
        tally.saw_output += 1
        tally.tokens_seen += body["usage"]["completion_tokens"]
        tally.completed_usage.append(body["usage"])
        tally.add(phase, "completed")
    else:
        _check_error(body)
        tally.add(phase, "error")


def _check_error(body: dict) -> None:
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}, body


async def storm(base: str, model: str, n: int, concurrency: int, seed: int,
                phases: tuple[str, ...] = PHASES) -> Tally:
    """``n`` misbehaving clients, ``concurrency`` at a time, phases drawn at random (seeded)."""
    rng = random.Random(seed)
    tally = Tally()
    sem = asyncio.Semaphore(concurrency)
    async with _client() as client:
        async def one(phase: str) -> None:
            async with sem:
                await one_request(client, base, model, phase, rng, tally)

        await asyncio.gather(*(one(rng.choice(phases)) for _ in range(n)))
    return tally


async def fresh(base: str, model: str, n: int, max_tokens: int = 4) -> Tally:
    """``n`` well-behaved concurrent requests (half streamed); all should complete."""
    tally = Tally()
    async with _client() as client:
        await asyncio.gather(*(_run(client, base, chat_body(model, stream=bool(i % 2), max_tokens=max_tokens),
                                    tally, "fresh") for i in range(n)))
    return tally


def usage_totals(base: str, api_key: str = DEMO_KEY) -> dict:
    """The account's ledger totals for all models: requests and tokens, and ``batch_requests``."""
    r = httpx.get(base + "/usage", headers={"Authorization": f"Bearer {api_key}"}, timeout=60)
    r.raise_for_status()
    total = Counter()
    for row in r.json()["data"]:
        for k in ("requests", "prompt_tokens", "cached_tokens", "completion_tokens"):
            total[k] += row[k]
        total["batch_requests"] += row["batch"]["requests"]
    return dict(total)

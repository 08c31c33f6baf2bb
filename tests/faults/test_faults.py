"""Every way out of a request, on a real Serve app: capacity comes back, nothing hangs, usage counts.

The goal of each test is the invariant, not a timing: after the fault the gate's in-flight count
and every engine return to zero, fresh requests all succeed, no client hangs, and every request
that produced output is billed exactly once.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.conftest import DEMO_KEY
from tests.faults.harness import AUTH, FAULT_MODEL, fault_config
from tests.faults.drivers import PHASES, chat_body, fresh, storm, usage_totals


@pytest.fixture(scope="module")
def app(deploy):
    return deploy("faults", fault_config(seqs=4))


def _client(app, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.base, api_key=DEMO_KEY, max_retries=0, timeout=60, **kw)


def test_hundreds_of_disconnects_at_every_phase_leave_full_capacity(app):
    before = usage_totals(app.base)
    tally = asyncio.run(storm(app.base, FAULT_MODEL, n=300, concurrency=24, seed=1))
    assert tally.outcomes["hung"] == 0, tally.outcomes
    assert {p for p, _ in tally.by_phase} == set(PHASES)
    gate = app.wait_idle()
    assert gate["in_flight"] == 0 and gate["waiting"] == 0, gate
    assert not any(app.pool_stats().values())
    after_fresh = asyncio.run(fresh(app.base, FAULT_MODEL, n=2 * gate["slots"]))
    assert after_fresh.outcomes == {"completed": 2 * gate["slots"]}, after_fresh.outcomes
    billed = usage_totals(app.base)
    events = billed.get("requests", 0) - before.get("requests", 0)
    completed = tally.outcomes["completed"] + after_fresh.outcomes["completed"]
    # Every request that reached a client with output is billed once; none more than once.
    assert tally.saw_output + after_fresh.saw_output <= events <= 300 + after_fresh.outcomes.total()
    tokens = billed.get("completion_tokens", 0) - before.get("completion_tokens", 0)
    assert tokens >= tally.tokens_seen + after_fresh.tokens_seen
    assert completed > 0


def test_a_timed_out_request_stops_its_engine(deploy):
    # One replica running one sequence at a time: if the engine kept generating after the 504,
    # the next request would wait behind it past its own deadline.
    app = deploy("timeout", fault_config(replicas=1, seqs=1, request_timeout_s=1.5))
    client = _client(app)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=FAULT_MODEL, messages=[{"role": "user", "content": "long"}],
                                       max_tokens=1500)
    assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
    assert client.chat.completions.create(model=FAULT_MODEL, messages=[{"role": "user", "content": "short"}],
                                          max_tokens=4).usage.completion_tokens == 4
    assert app.wait_idle()["in_flight"] == 0
    assert usage_totals(app.base)["requests"] == 2  # the 504 is billed for what ran before it


def test_a_stalled_stream_ends_with_an_error_event_not_a_hang(deploy):
    # Each engine step takes 0.5 s, longer than the stream's idle deadline.
    cfg = fault_config(replicas=1, seqs=1, stream_idle_timeout_s=0.3)
    cfg["models"][0]["engine"].update(stream_interval_s=0, latency={"step_base_s": 0.5})
    app = deploy("stall", cfg)
    with httpx.stream("POST", app.base + "/chat/completions", headers=AUTH, timeout=30,
                      json=chat_body(FAULT_MODEL, stream=True, max_tokens=5)) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert '"stream_timeout"' in events[-1], events
    assert app.wait_idle()["in_flight"] == 0
    assert usage_totals(app.base)["requests"] == 1  # the token it sent is billed


def test_a_cancelled_waiter_in_the_gate_passes_its_slot_on(deploy):
    app = deploy("gatewait", fault_config(replicas=1, seqs=1))
    tally = asyncio.run(storm(app.base, FAULT_MODEL, n=60, concurrency=20, seed=2,
                              phases=("queued", "non_stream")))
    assert tally.outcomes["hung"] == 0
    assert app.wait_idle()["in_flight"] == 0
    assert asyncio.run(fresh(app.base, FAULT_MODEL, n=4)).outcomes == {"completed": 4}


def _running_replica(app, deadline_s: float = 20.0) -> str:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        busy = [r for r, n in app.pool_stats().items() if n]
        if busy:
            return busy[0]
        time.sleep(0.02)
    raise AssertionError("no replica picked the request up")


def test_replica_killed_before_the_first_token_is_retried_transparently(deploy):
    cfg = fault_config(replicas=2, seqs=4)
    cfg["models"][0]["engine"]["latency"] = {"prefill_base_s": 4.0, "step_base_s": 0.01}
    app = deploy("killfirst", cfg)
    client = _client(app)

    async def scenario():
        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(None, lambda: client.chat.completions.create(
            model=FAULT_MODEL, messages=[{"role": "user", "content": "survive"}], max_tokens=4))
        victim = await loop.run_in_executor(None, _running_replica, app)
        app.kill_replica(victim)
        return await call

    resp = asyncio.run(scenario())
    assert resp.usage.completion_tokens == 4
    assert usage_totals(app.base)["requests"] == 1


def test_replica_killed_mid_stream_ends_with_an_error_event_and_bills_what_was_sent(deploy):
    app = deploy("killmid", fault_config(replicas=2, seqs=4))
    seen = 0
    with httpx.stream("POST", app.base + "/chat/completions", headers=AUTH, timeout=60,
                      json=chat_body(FAULT_MODEL, stream=True, max_tokens=1500)) as r:
        assert r.status_code == 200
        events = []
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line)
            if '"choices":[{' in line:
                seen += 1
            if seen == 3:
                app.kill_replica(_running_replica(app))
    assert '"stream_interrupted"' in events[-1], events[-1]
    assert '"error"' in events[-1]
    billed = usage_totals(app.base)
    assert billed["requests"] == 1 and billed["completion_tokens"] >= seen
    # Capacity is back: the gate is empty and the replacement serves.
    assert app.wait_idle()["in_flight"] == 0
    assert asyncio.run(fresh(app.base, FAULT_MODEL, n=8)).outcomes == {"completed": 8}

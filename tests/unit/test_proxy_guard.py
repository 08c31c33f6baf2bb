"""The proxy middleware on its own, driven as an ASGI app: bodies read whole within a deadline and
a cap, requests per key capped (a request past the cap waits for a slot, briefly), refusals that
hold repeated without the app, and answered only after the refusal delay."""

from __future__ import annotations

import asyncio
import json

import pytest

from deployments.proxy_guard import ProxyGuard


class App:
    """A downstream ASGI app that records what it received and answers as told."""

    def __init__(self, status: int = 200, headers: list | None = None, body: bytes = b'{"ok":true}',
                 gate: asyncio.Event | None = None):
        self.calls: list[list[dict]] = []
        self.status, self.headers, self.body, self.gate = status, headers or [], body, gate

    async def __call__(self, scope, receive, send):
        got = [await receive()]
        while got[-1].get("more_body"):
            got.append(await receive())
        self.calls.append(got)
        if self.gate is not None:
            await self.gate.wait()
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", b"application/json"), *self.headers]})
        await send({"type": "http.response.body", "body": self.body})


def scope(key: bytes = b"Bearer k1", length: int | None = None, method: str = "POST", ctype=b"application/json"):
    headers = [(b"authorization", key), (b"content-type", ctype)]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http", "method": method, "path": "/v1/chat/completions", "headers": headers,
            "client": ("127.0.0.1", 5000)}


def receiver(*chunks: bytes, stall: bool = False):
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1 or stall}
                for i, c in enumerate(chunks)]

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # a client that sends nothing more

    return receive


async def call(guard, sc, receive) -> tuple[int, dict, dict]:
    sent = []

    async def send(message):
        sent.append(message)

    await guard(sc, receive, send)
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(body)


async def _key_full(body=lambda i: b"{}"):
    """A guard whose key k1 holds both its places (EMBER_PROXY_MAX_PER_KEY=2) until ``gate`` is set."""
    gate = asyncio.Event()
    app = App(gate=gate)
    guard = ProxyGuard(app)
    held = [asyncio.create_task(call(guard, scope(), receiver(body(i)))) for i in range(2)]
    while len(app.calls) < 2:
        await asyncio.sleep(0)
    return gate, app, guard, held


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("EMBER_PROXY_BODY_TIMEOUT_S", "0.2")
    monkeypatch.setenv("EMBER_PROXY_MAX_BODY_BYTES", "100")
    monkeypatch.setenv("EMBER_PROXY_MAX_PER_KEY", "2")
    monkeypatch.setenv("EMBER_PROXY_REFUSAL_DELAY_S", "0.05")


def test_a_body_in_pieces_reaches_the_app_whole_in_one_message(env):
    app = App()
    status, _, _ = asyncio.run(call(ProxyGuard(app), scope(), receiver(b'{"a":', b' 1', b"}")))
    assert status == 200
    assert app.calls == [[{"type": "http.request", "body": b'{"a": 1}', "more_body": False}]]


def test_a_body_past_the_cap_is_413_and_never_reaches_the_app(env):
    app = App()
    status, headers, body = asyncio.run(call(ProxyGuard(app), scope(), receiver(b"x" * 60, b"x" * 60)))
    assert (status, body["error"]["code"]) == (413, "request_too_large") and app.calls == []
    status, _, body = asyncio.run(call(ProxyGuard(app), scope(length=101), receiver(b"x")))
    assert (status, body["error"]["code"]) == (413, "request_too_large") and app.calls == []


def test_a_body_that_stalls_past_the_deadline_is_408(env):
    app = App()
    status, headers, body = asyncio.run(call(ProxyGuard(app), scope(), receiver(b"{", stall=True)))
    assert (status, body["error"]["code"]) == (408, "body_timeout") and app.calls == []
    assert headers["connection"] == "close"


def test_multipart_uploads_and_gets_pass_through_unbuffered(env):
    app = App()
    status, _, _ = asyncio.run(call(ProxyGuard(app), scope(ctype=b"multipart/form-data; boundary=x"),
                                    receiver(b"x" * 80, b"x" * 80)))
    assert status == 200 and [m["body"] for m in app.calls[0]] == [b"x" * 80, b"x" * 80]


def test_requests_per_key_are_capped_and_other_keys_pass(env):
    async def run():
        gate, app, guard, held = await _key_full()
        t0 = asyncio.get_running_loop().time()
        third = await call(guard, scope(), receiver(b"{}"))
        assert asyncio.get_running_loop().time() - t0 >= 0.045  # refused after waiting for a slot
        assert guard.waiting == {}
        gate.set()
        other = await call(guard, scope(key=b"Bearer k2"), receiver(b"{}"))
        done = [await t for t in held]
        after = await call(guard, scope(), receiver(b"{}"))
        return third, other, done, after, guard

    third, other, done, after, guard = asyncio.run(run())
    assert third[0] == 429 and third[2]["error"]["code"] == "concurrency_limit_exceeded"
    assert third[1]["retry-after"] == "1"
    assert other[0] == 200 and [d[0] for d in done] == [200, 200] and after[0] == 200
    assert guard.in_flight == {}  # every place given back


def test_a_request_past_the_cap_takes_the_first_slot_released_within_the_delay(env, monkeypatch):
    monkeypatch.setenv("EMBER_PROXY_REFUSAL_DELAY_S", "5")
    monkeypatch.setenv("EMBER_PROXY_MAX_WAITING_PER_KEY", "2")

    async def run():
        gate, app, guard, held = await _key_full(lambda i: b'{"n":%d}' % i)
        waiting = [asyncio.create_task(call(guard, scope(), receiver(b'{"n":%d}' % i))) for i in (2, 3)]
        while sum(len(q) for q in guard.waiting.values()) < 2:
            await asyncio.sleep(0)
        t0 = asyncio.get_running_loop().time()
        refused = await call(guard, scope(), receiver(b"{}"))  # past the waiting bound: at once
        refused_s = asyncio.get_running_loop().time() - t0
        gate.set()
        done = [await t for t in held + waiting]
        return refused, refused_s, done, app, guard

    refused, refused_s, done, app, guard = asyncio.run(run())
    assert refused[0] == 429 and refused[2]["error"]["code"] == "concurrency_limit_exceeded" and refused_s < 1
    assert [d[0] for d in done] == [200] * 4
    assert [c[0]["body"] for c in app.calls] == [b'{"n":0}', b'{"n":1}', b'{"n":2}', b'{"n":3}']  # in order
    assert guard.in_flight == {} and guard.waiting == {}


def test_a_request_that_leaves_while_waiting_gives_back_its_place(env, monkeypatch):
    monkeypatch.setenv("EMBER_PROXY_REFUSAL_DELAY_S", "5")

    async def run():
        gate, app, guard, held = await _key_full()
        waiter = asyncio.create_task(call(guard, scope(), receiver(b"{}")))
        while not guard.waiting:
            await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        gate.set()
        return [await t for t in held], guard

    done, guard = asyncio.run(run())
    assert [d[0] for d in done] == [200, 200] and guard.in_flight == {} and guard.waiting == {}


def test_a_held_request_is_answered_when_its_hold_ends_or_after_the_refusal_delay(env):
    refusal = json.dumps({"error": {"message": "rate limit exceeded", "type": "rate_limit_error",
                                    "param": None, "code": "rate_limit_exceeded"}}).encode()

    async def timed(guard):
        t0 = asyncio.get_running_loop().time()
        out = await call(guard, scope(), receiver(b"{}"))
        return out, asyncio.get_running_loop().time() - t0

    for hold_s, at_least_s in (("0.02", 0.015), ("30", 0.045)):  # the refusal delay is 0.05 s (env)
        app = App(status=429, body=refusal, headers=[(b"retry-after", b"1"), (b"x-ember-hold-key-s", hold_s.encode())])
        guard = ProxyGuard(app, clock=lambda: 0.0)  # time stands still: only the wait passes
        asyncio.run(call(guard, scope(), receiver(b"{}")))
        (status, _, body), took_s = asyncio.run(timed(guard))
        assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded") and len(app.calls) == 1
        assert at_least_s <= took_s < 1.0


def test_an_account_wide_refusal_is_repeated_by_the_proxy_until_it_expires(env):
    now = [100.0]
    refusal = json.dumps({"error": {"message": "too many", "type": "rate_limit_error", "param": None,
                                    "code": "too_many_failed_requests"}}).encode()
    app = App(status=429, headers=[(b"retry-after", b"5"), (b"x-ember-hold-key-s", b"4.5")], body=refusal)
    guard = ProxyGuard(app, clock=lambda: now[0])
    status, headers, body = asyncio.run(call(guard, scope(), receiver(b"{}")))
    assert status == 429 and "x-ember-hold-key-s" not in headers and body["error"]["code"] == "too_many_failed_requests"
    assert len(app.calls) == 1
    now[0] += 2.0  # held: answered without the app and without reading a body
    status, headers, body = asyncio.run(call(guard, scope(), receiver(b"{", stall=True)))
    assert (status, headers["retry-after"], body["error"]["code"]) == (429, "3", "too_many_failed_requests")
    assert len(app.calls) == 1
    status, _, _ = asyncio.run(call(guard, scope(key=b"Bearer other"), receiver(b"{}")))
    assert len(app.calls) == 2  # another key goes through
    now[0] += 3.0  # expired
    app.status, app.headers, app.body = 200, [], b"{}"
    status, _, _ = asyncio.run(call(guard, scope(), receiver(b"{}")))
    assert status == 200 and len(app.calls) == 3


def test_a_refusal_for_one_model_is_repeated_for_that_model_only(env):
    now = [0.0]
    refusal = json.dumps({"error": {"message": "rate limit exceeded", "type": "rate_limit_error",
                                    "param": "prompt", "code": "rate_limit_exceeded"}}).encode()
    app = App(status=429, body=refusal,
              headers=[(b"retry-after", b"1"), (b"x-ember-hold-key-s", b"0.800"), (b"x-ember-hold-model", b"m/a")])
    guard = ProxyGuard(app, clock=lambda: now[0])
    status, headers, _ = asyncio.run(call(guard, scope(), receiver(b'{"model": "m/a"}')))
    assert status == 429 and "x-ember-hold-model" not in headers and len(app.calls) == 1
    app.status, app.headers, app.body = 200, [], b"{}"
    status, _, body = asyncio.run(call(guard, scope(), receiver(b'{"model":"m/a","messages":[]}')))
    assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded") and len(app.calls) == 1
    status, _, _ = asyncio.run(call(guard, scope(), receiver(b'{"model": "m/b"}')))
    assert status == 200 and len(app.calls) == 2  # another model of the same key
    now[0] = 0.9  # the limiter's memory has passed
    status, _, _ = asyncio.run(call(guard, scope(), receiver(b'{"model": "m/a"}')))
    assert status == 200 and len(app.calls) == 3 and guard.model_holds == {}


def test_a_bad_setting_fails_loudly(monkeypatch):
    monkeypatch.setenv("EMBER_PROXY_MAX_PER_KEY", "many")
    with pytest.raises(ValueError, match="EMBER_PROXY_MAX_PER_KEY"):
        ProxyGuard(App())

"""One tenant misbehaving: caps before the body, deadlines on it, refusals before parsing, budgets
that hold for generated tokens and spend, private models, text that stays text, and Serve's own
control headers and errors."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import select
import socket
import time
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from tests.conftest import ADMIN_TOKEN, DEMO_KEY

MODEL = "accounts/ember/models/guarded"
PRIVATE = "accounts/acme/models/secret"
MSG = [{"role": "user", "content": "Count the tokens in this message, please."}]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _config() -> dict:
    limit = {"prompt": 20_000, "uncached": 20_000, "generated": 20_000}
    slow = {"kind": "sim", "block_size": 32, "max_num_seqs": 8, "latency": {"step_base_s": 0.002}}
    return {
        "models": [
            {"id": MODEL, "context_length": 8192, "num_replicas": 1, "resources": {"num_cpus": 0.05},
             "engine": slow, "limits": {"floor": limit, "ceiling": limit},
             "pricing": {"standard": {"input": 10_000.0, "output": 10_000.0}}},
            {"id": PRIVATE, "context_length": 512, "num_replicas": 1, "resources": {"num_cpus": 0.05},
             "engine": {"kind": "sim", "block_size": 32}},
        ],
        "ingress": {"num_cpus": 0.05, "max_concurrent_per_account": 4, "body_read_timeout_s": 1.0,
                    "failed_large_limit": 3, "failed_large_window_s": 30,
                    "usage_requests_per_minute": 3, "max_completion_tokens": 4000},
        "rate_limit": {"enabled": True, "lease_fraction": 0.02},
    }


@pytest.fixture(scope="module")
def app(serve_instance):
    from ray import serve

    from cluster.builder import build_app

    serve.run(build_app(_config()), name="abuse", route_prefix="/abuse")
    yield f"{serve_instance}/abuse"
    serve.delete("abuse")


def _client(app, key: str = DEMO_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=app + "/v1", api_key=key, max_retries=0, timeout=60)


def _account(app, name: str, **fields) -> str:
    r = httpx.post(app + "/admin/accounts", json={"id": name, **fields}, headers=ADMIN, timeout=30)
    assert r.status_code in (200, 201), r.text
    return httpx.post(f"{app}/admin/accounts/{name}/keys", headers=ADMIN, timeout=30).json()["key"]


def _trickle(app, key: str, declared: int = 1000) -> socket.socket:
    """A connection that sends its headers and one byte of a body, then nothing."""
    u = urlsplit(app)
    s = socket.create_connection((u.hostname, u.port))
    s.sendall((f"POST {u.path}/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n{{").encode())
    return s


def _response(s: socket.socket, timeout_s: float = 30) -> tuple[bytes, dict]:
    s.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, json.loads(body[body.index(b"{"):])


def test_an_account_past_its_concurrency_cap_gets_429(app):
    client = _client(app, _account(app, "greedy"))
    streams = []
    try:
        for _ in range(4):  # four long streams hold the account's four places in the ingress
            stream = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2000, stream=True)
            next(iter(stream))
            streams.append(stream)
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)
        assert e.value.body["code"] == "concurrency_limit_exceeded"
        assert _client(app).chat.completions.create(model=MODEL, messages=MSG, max_tokens=2).choices
    finally:
        for stream in streams:
            stream.close()


def _answered(socks: list[socket.socket], want: int, within_s: float) -> list[bytes]:
    """The first response bytes of sockets that got an answer, until ``want`` did or time ran out."""
    got: dict[socket.socket, bytes] = {}
    deadline = time.monotonic() + within_s
    while len(got) < want and time.monotonic() < deadline:
        ready, _, _ = select.select([s for s in socks if s not in got], [], [], 0.1)
        for s in ready:
            got[s] = s.recv(65536)
    return list(got.values())


def test_slow_senders_are_held_and_capped_in_the_proxy_not_the_ingress(app):
    # The proxy reads bodies itself and caps a key at 64 requests (EMBER_PROXY_MAX_PER_KEY in
    # tests/conftest.py). Trickling bodies wait there, so the ingress (whose cap for this account
    # is 4) never sees them and the account's complete requests pass.
    key = _account(app, "trickler")
    socks = [_trickle(app, key) for _ in range(10)]
    try:
        time.sleep(0.5)
        assert _client(app, key).chat.completions.create(model=MODEL, messages=MSG, max_tokens=2).choices
        socks += [_trickle(app, key) for _ in range(60)]
        answered = _answered(socks, want=6, within_s=3.0)  # well before the 5 s body deadline
        assert len(answered) == 70 - 64, answered
        assert all(a.startswith(b"HTTP/1.1 429") for a in answered), answered
        assert _client(app).chat.completions.create(model=MODEL, messages=MSG, max_tokens=2).choices
    finally:
        for s in socks:
            s.close()


def test_a_body_that_trickles_past_its_deadline_gets_408_in_the_openai_shape(app):
    with _trickle(app, DEMO_KEY, declared=100) as s:
        head, body = _response(s)
    assert head.startswith(b"HTTP/1.1 408"), head
    assert body["error"]["code"] == "body_timeout"


def test_an_account_whose_large_bodies_keep_failing_is_refused_then_held_in_the_proxy(app, openai_schemas):
    key = _account(app, "flooder")
    bad = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}] * 9000}  # > context
    http = httpx.Client(base_url=app + "/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    codes = [http.post("/chat/completions", json=bad).status_code for _ in range(3)]
    assert codes == [400, 400, 400]  # failed_large_limit: 3 (in _config)
    r = http.post("/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": 1})
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_failed_requests", r.text
    assert int(r.headers["retry-after"]) >= 1 and "x-ember-hold-key-s" not in r.headers
    openai_schemas("ErrorResponse").validate(r.json())
    # Now the proxy answers for the ingress, without waiting for a body that never comes.
    with _trickle(app, key) as s:
        head, body = _response(s, timeout_s=3)  # the proxy's body deadline is 5 s
    assert head.startswith(b"HTTP/1.1 429"), head
    assert body["error"]["code"] == "too_many_failed_requests"
    # Other accounts are not affected.
    assert _client(app).chat.completions.create(model=MODEL, messages=MSG, max_tokens=1).choices


def test_large_bodies_sent_at_once_are_parsed_only_until_the_account_is_refused(app):
    # Large bodies of one account are parsed one at a time; those queued behind the ones that
    # failed are refused (429) once the account reaches failed_large_limit (3), not parsed.
    key = _account(app, "burster")
    bad = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}] * 9000}

    async def send_all():
        async with httpx.AsyncClient(base_url=app + "/v1", headers={"Authorization": f"Bearer {key}"},
                                     timeout=30) as c:
            # 4: the account's concurrent-request cap in this ingress (max_concurrent_per_account)
            return await asyncio.gather(*(c.post("/chat/completions", json=bad) for _ in range(4)))

    answers = asyncio.run(send_all())
    codes = sorted(r.status_code for r in answers)
    assert codes == [400, 400, 400, 429], [r.text[:120] for r in answers]
    assert {r.json()["error"]["code"] for r in answers if r.status_code == 400} == {"context_length_exceeded"}
    assert {r.json()["error"]["code"] for r in answers if r.status_code == 429} == {"too_many_failed_requests"}


def test_generated_tokens_are_reserved_in_full_so_a_burst_cannot_pass_the_limit(app):
    client = _client(app, _account(app, "bursty"))
    # n x max_tokens = 32,000 > the 20,000 a minute limit: it can never fit, refused at once.
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model=MODEL, messages=MSG, n=8, max_tokens=4000)
    assert e.value.body["param"] == "generated"

    def one() -> int:
        try:
            return client.chat.completions.create(model=MODEL, messages=MSG, n=2, max_tokens=2000).usage.completion_tokens
        except openai.RateLimitError:
            return -1

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: one(), range(8)))
    admitted = [r for r in results if r >= 0]
    assert len(admitted) <= 5  # 20,000 / 4,000 reserved each


def test_a_limited_account_is_refused_before_its_body_is_parsed(app):
    key = _account(app, "limited")
    client = _client(app, key)
    # ~7,000 of the 20,000 prompt tokens a minute: the third is short by thousands, so its refusal
    # stands for seconds (the proxy holds it for at most 1 s), not the few ms a near miss would
    long = [{"role": "user", "content": "word " * 7000}]
    with pytest.raises(openai.RateLimitError):
        for _ in range(10):
            client.chat.completions.create(model=MODEL, messages=long, max_tokens=1)
    # A body that would fail parsing (400) gets the remembered 429: it was never parsed.
    r = httpx.post(app + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                   content=b'{"model": "' + MODEL.encode() + b'", "messages": ' + b"[" * 10 + b"}")
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "rate_limit_exceeded"


def test_concurrent_requests_cannot_overshoot_the_monthly_spend_limit(app):
    # One request may cost up to (~15 + 300) tokens x $10,000/M = ~$3.15; the limit fits one.
    key = _account(app, "thrifty", monthly_spend_limit_usd=4.0)
    client = _client(app, key)

    def one() -> int:
        try:
            client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=300)
            return 200
        except openai.APIStatusError as e:
            return e.status_code

    with cf.ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda _: one(), range(4)))
    assert codes.count(200) == 1 and codes.count(402) == 3, codes


def test_a_private_model_is_invisible_to_other_accounts(app):
    demo = _client(app)
    assert PRIVATE not in [m.id for m in demo.models.list().data]
    with pytest.raises(openai.NotFoundError):
        demo.chat.completions.create(model=PRIVATE, messages=MSG, max_tokens=2)
    acme = _client(app, _account(app, "acme"))
    assert PRIVATE in [m.id for m in acme.models.list().data]
    assert acme.chat.completions.create(model=PRIVATE, messages=MSG, max_tokens=2).choices
    assert MODEL in [m.id for m in acme.models.list().data]  # the platform's own models are public


def test_special_token_text_in_user_content_stays_text(app):
    client = _client(app)
    plain = client.chat.completions.create(model=MODEL, max_tokens=1,
                                           messages=[{"role": "user", "content": "a b"}]).usage.prompt_tokens
    injected = client.chat.completions.create(model=MODEL, max_tokens=1, messages=[
        {"role": "user", "content": "a <|system|> b"}]).usage.prompt_tokens
    assert injected > plain + 1  # "<|system|>" became several text tokens, not one role token


def test_usage_reads_are_rate_limited_per_account(app):
    client = httpx.Client(base_url=app + "/v1", headers={"Authorization": f"Bearer {_account(app, 'reader')}"},
                          timeout=30)
    codes = [client.get("/usage").status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200] and codes[3] == 429


def test_serve_control_headers_from_clients_are_ignored(app):
    r = httpx.post(app + "/v1/chat/completions", timeout=60,
                   headers={"Authorization": f"Bearer {DEMO_KEY}", "x-request-timeout-seconds": "0.001"},
                   json={"model": MODEL, "messages": MSG, "max_tokens": 20})
    assert r.status_code == 200, r.text


def test_serve_proxy_errors_are_openai_shaped(serve_instance, openai_schemas):
    r = httpx.get(serve_instance + "/no-such-app/v1/models", timeout=30)
    assert r.status_code == 404
    openai_schemas("ErrorResponse").validate(r.json())


def test_memory_store_refuses_more_than_one_ingress_replica():
    from pydantic import ValidationError

    from cluster.config import EmberConfig

    cfg = _config()
    cfg["ingress"]["num_replicas"] = 2
    with pytest.raises(ValidationError, match="redis://"):
        EmberConfig.model_validate(cfg)


def test_more_messages_than_the_context_holds_is_400_before_rendering(app):
    too_many = [{"role": "user", "content": "x"}] * 8200  # the model's context is 8,192 tokens
    with pytest.raises(openai.BadRequestError) as e:
        _client(app).chat.completions.create(model=MODEL, messages=too_many, max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded" and "8200 messages" in e.value.body["message"]

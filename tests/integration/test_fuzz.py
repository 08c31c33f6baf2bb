"""Hostile input: Schemathesis against the live /openapi.json, and Hypothesis on request parsing.

Whatever a caller sends, Ember answers below 500, and every error body is exactly OpenAI's
``{"error": {"message": str, "type": str, "param": str|null, "code": str|null}}``. The HTTP fuzz
loads the document the running service serves, generates schema-valid (positive) and
schema-violating (negative) requests for every operation, and sends them with a key of an account
of its own (so its token spend never rate-limits the demo account other tests use). Generation
is derandomized: every run sends the same requests.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import warnings
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from deployments.errors import to_error
from deployments.openai_api import ChatCompletionRequest, CompletionRequest
from tests.conftest import ADMIN_TOKEN, DEMO_KEY, SIM_MODEL

REQUEST_MODELS = (ChatCompletionRequest, CompletionRequest)
ERROR_KEYS = {"message", "type", "param", "code"}

# Examples per (operation, generation mode). The POSTs are where parsing and the engine live.
# EMBER_FUZZ_SCALE=N multiplies them for a deeper run by hand (same seed, more examples).
_SCALE = max(1, int(os.environ.get("EMBER_FUZZ_SCALE", "1")))
EXAMPLES = {"POST": 50 * _SCALE, "GET": 15 * _SCALE, "DELETE": 15 * _SCALE}
FUZZ_SETTINGS = dict(
    derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
)


def assert_error_shape(body) -> None:
    """Exactly the OpenAI error shape: no more keys, no fewer, the right types."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err, dict) and set(err) == ERROR_KEYS, body
    assert isinstance(err["message"], str) and err["message"], body
    assert isinstance(err["type"], str) and err["type"], body
    assert err["param"] is None or isinstance(err["param"], str), body
    assert err["code"] is None or isinstance(err["code"], str), body


def assert_api_error(exc: BaseException) -> None:
    """What a parse failure becomes at the edge: a 4xx with the exact body."""
    err = to_error(exc)
    assert 400 <= err.status < 500, (err.status, err.body(), exc)
    body = json.loads(json.dumps(err.body(), allow_nan=False))
    assert_error_shape(body)


# -- request parsing, in process (no HTTP) --------------------------------------------------------

_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70, max_value=2**70)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_MSG = {"role": "user", "content": "hello"}
_roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "bot", ""])
_messages = st.lists(
    st.fixed_dictionaries({"role": _roles}, optional={
        "content": st.none() | st.text(max_size=20) | st.lists(
            st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=10)}),
            max_size=3),
        "name": st.none() | st.text(max_size=5)}),
    max_size=3,
) | json_values
_small_ints = st.integers(min_value=-3, max_value=40)
_texts = st.text(max_size=8)
# Per field: values near its bounds, plus anything at all.
_FIELD_VALUES = {
    "model": _texts | st.just("m" * 513),
    "max_tokens": _small_ints | st.just(2**31),
    "max_completion_tokens": _small_ints | st.just(2**31 - 1),
    "temperature": st.floats(-1, 3) | st.integers(-1, 3),
    "top_p": st.floats(-0.5, 1.5) | st.sampled_from([0, 1, 0.0]),
    "top_k": _small_ints | st.sampled_from([-2, 1_000_001]),
    "n": _small_ints | st.just(129),
    "seed": st.integers(-2**64, 2**64),
    "stop": st.none() | _texts | st.lists(_texts, max_size=6),
    "stream": st.booleans(),
    "stream_options": st.none() | st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | _texts}),
    "user": st.none() | _texts | st.just("u" * 513),
    "prompt_cache_key": st.none() | _texts,
    "prompt_cache_max_len": st.none() | _small_ints,
    "perf_metrics_in_response": st.booleans(),
    "ignore_eos": st.booleans(),
    "logprobs": st.booleans() | st.none() | _small_ints,
    "top_logprobs": st.none() | st.integers(-1, 21),
    "service_tier": st.none() | st.sampled_from(["auto", "default", "priority", "flex", "scale", "fast", "x"]),
    "echo": st.booleans(),
    "suffix": st.none() | _texts,
    "messages": _messages,
    "prompt": (_texts | st.lists(st.integers(-1, 2**31), max_size=4) | st.lists(_texts, max_size=3)
               | st.lists(st.lists(st.integers(-1, 2**31), max_size=3), max_size=3)),
}
_changes = st.lists(st.sampled_from(sorted(_FIELD_VALUES)), max_size=4, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({n: _FIELD_VALUES[n] | json_values for n in names}))
# Near-valid bodies: a valid base with some fields replaced, which is what reaches the validators.
near_valid = st.builds(
    lambda base, changes: {**base, **changes},
    st.sampled_from([{"model": "m", "messages": [_MSG]}, {"model": "m", "prompt": "hi"},
                     {"model": "m", "prompt": [1, 2, 3]}, {"model": "m", "prompt": [[1, 2]]},
                     {"model": "m", "prompt": "hi", "messages": [_MSG]}]),
    _changes,
)


def _parse_all(data) -> None:
    for model in REQUEST_MODELS:
        try:
            req = model.model_validate_json(data)
        except ValidationError as exc:  # pydantic turns a validator's ValueError into this
            assert_api_error(exc)
            continue
        # What the serving layer reads from an accepted request must not blow up either.
        assert req.model and len(req.model) <= 512
        max_tokens = req.requested_max_tokens
        assert max_tokens is None or max_tokens >= 1
        req.sampling_params(max_tokens or 16)
        assert isinstance(req.include_usage, bool) and isinstance(req.use_cache, bool)
        if isinstance(req, ChatCompletionRequest):
            assert all(isinstance(m.text, str) for m in req.messages)
        for f in ("temperature", "top_p"):
            assert math.isfinite(getattr(req, f))


def _has_non_finite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(_has_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    return False


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_parsing_arbitrary_bytes_is_a_clean_400(data):
    _parse_all(data)


@settings(max_examples=400, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(near_valid, near_valid, json_values))
def test_parsing_arbitrary_json_validates_or_is_a_clean_400(value):
    data = json.dumps(value, allow_nan=True)  # NaN and Infinity literals included, on purpose
    if _has_non_finite(value):
        for model in REQUEST_MODELS:
            with pytest.raises(ValidationError) as info:
                model.model_validate_json(data)
            assert_api_error(info.value)
    _parse_all(data)
    _parse_all(data.encode())


@pytest.mark.parametrize("body", [
    b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "unknown": NaN}',
    b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "x": {"y": [Infinity]}}',
    b'{"model": "m", "prompt": "hi", "top_p": -Infinity}',
    b'{"model": "m", "prompt": "hi", "metadata": {"score": -Infinity}}',
    b'{"model": "m", "prompt": "hi", "logit_bias": {"1": NaN}}',
])
def test_non_finite_literals_are_not_json(body):
    for model in REQUEST_MODELS:
        for data in (body, body.decode(), bytearray(body)):
            with pytest.raises(ValidationError) as info:
                model.model_validate_json(data)
            assert_api_error(info.value)


def test_the_words_nan_and_infinity_in_strings_are_fine():
    req = CompletionRequest.model_validate_json(b'{"model": "NaN", "prompt": "Infinity and NaN", "user": "-Infinity"}')
    assert req.prompt == "Infinity and NaN" and req.user == "-Infinity"


# -- the live service -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(sim_app) -> dict:
    """The app's root URL and a key of a fresh account of its own (the demo key if the admin API
    will not make one), so the fuzz's spend never rate-limits the demo account other tests use."""
    root = sim_app.removesuffix("/v1")
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    account = "fuzz-" + secrets.token_hex(4)
    with httpx.Client(base_url=root, timeout=30) as c:
        made = c.post("/admin/accounts", json={"id": account}, headers=admin)
        key = c.post(f"/admin/accounts/{account}/keys", headers=admin) if made.status_code == 201 else made
    if key.status_code != 201:
        warnings.warn(f"fuzzing with the demo key: the admin API answered {key.status_code} {key.text[:200]}")
        return {"root": root, "key": DEMO_KEY, "account": "demo"}
    return {"root": root, "key": key.json()["key"], "account": account}


@pytest.fixture(scope="module")
def api_schema(service):
    return schemathesis.openapi.from_url(service["root"] + "/openapi.json")


def test_openapi_document_describes_the_api(service):
    resp = httpx.get(service["root"] + "/openapi.json", timeout=30)
    assert resp.status_code == 200
    doc = resp.json()
    assert doc["openapi"].startswith("3.1")
    paths = doc["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/usage"} <= set(paths)
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"}
    schemas = doc["components"]["schemas"]
    for model in REQUEST_MODELS:
        expected = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in expected.pop("$defs", {}).items():
            assert schemas[name] == sub
        got = json.loads(json.dumps(schemas[model.__name__]))
        for prop in ("examples", "description"):
            got["properties"]["model"].pop(prop)
        assert got == expected
        assert schemas[model.__name__]["properties"]["model"]["examples"] == [SIM_MODEL]
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = paths[path]["post"]["responses"]
        assert {"200", "400", "401", "402", "404", "413", "429", "503", "504"} <= set(responses)
    error = doc["components"]["responses"]["Error429"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/Error"}


def _sse_events(text: str) -> list:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def _check_response(case, response) -> None:
    status = response.status_code
    sent = response.request  # what went on the wire, after any changes to the case
    request = f"{sent.method} {sent.url} body={sent.body!r:.800}"
    assert status < 500, f"{status} for {request}: {response.text[:600]}"
    ctype = (response.headers.get("content-type") or [""])[0]
    if status >= 400:
        assert ctype.startswith("application/json"), (status, ctype, request)
        assert_error_shape(response.json())
    elif ctype.startswith("text/event-stream"):
        events = _sse_events(response.text)
        assert events, request
        for payload in events[:-1]:
            chunk = json.loads(payload)
            if "error" in chunk:  # a stream that failed after it started ends with an error event
                assert_error_shape(chunk)
        if str(sent.url).split("?")[0].endswith("/responses"):  # the Responses API's events end without [DONE]
            last = json.loads(events[-1])
            assert last["type"] in ("response.completed", "response.incomplete", "error"), (events[-3:], request)
        else:
            assert events[-1] == "[DONE]" or "error" in json.loads(events[-1]), (events[-3:], request)
    # Status, content type and JSON bodies (successes and errors) as the document says.
    case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                             response_schema_conformance])


# How a generated request is aimed: most at the served model (random ids stop at 404), most of
# those with few tokens and choices (and no tool messages, which the demo template refuses) so the
# engine answers, and quickly, some of those streamed; some as generated.
AIMS = ["served-small", "served-small-stream", "served", "as-generated"]


def _aim(case, aim: str) -> None:
    body = case.body
    if aim == "as-generated" or not (isinstance(body, dict) and isinstance(body.get("model"), str)):
        return
    body["model"] = SIM_MODEL
    if aim.startswith("served-small"):
        for field, cap in (("max_tokens", 8), ("max_completion_tokens", 8), ("n", 2)):
            value = body.get(field)
            if isinstance(value, int) and not isinstance(value, bool):
                body[field] = max(1, min(value, cap))
        body.setdefault("max_tokens", 8)
        messages = body.get("messages")
        if isinstance(messages, list):  # the demo model's chat template takes no tool messages
            body["messages"] = [{**m, "role": "user"} if isinstance(m, dict) and m.get("role") == "tool" else m
                                for m in messages]
        body["prompt"] = _in_vocab(body.get("prompt"))
        if body["prompt"] is None:
            del body["prompt"]
    if aim.endswith("-stream"):
        body["stream"] = True


def _in_vocab(prompt):
    """Token ids the demo model knows (its vocabulary has 4096); anything else as it was."""
    if isinstance(prompt, list):
        return [_in_vocab(p) for p in prompt]
    if isinstance(prompt, int) and not isinstance(prompt, bool) and prompt >= 0:
        return prompt % 4096
    return prompt


def _status_label(response) -> str:
    if response.status_code < 400:
        sse = (response.headers.get("content-type") or [""])[0].startswith("text/event-stream")
        return f"{response.status_code} stream" if sse else str(response.status_code)
    try:
        err = response.json()["error"]
        return f"{response.status_code} {err['code'] or '-'} ({err['param'] or '-'})"
    except Exception:
        return str(response.status_code)


def _fuzz_operation(operation, mode: GenerationMode, headers: dict, root: str) -> Counter:
    sent: Counter = Counter()

    @settings(max_examples=EXAMPLES[operation.method.upper()], **FUZZ_SETTINGS)
    @given(case=operation.as_strategy(generation_mode=mode), aim=st.sampled_from(AIMS))
    def run(case, aim):
        _aim(case, aim)
        response = case.call(base_url=root, headers=headers, timeout=60)
        _check_response(case, response)
        sent[_status_label(response)] += 1

    run()
    return sent


def test_schemathesis_fuzz_no_server_errors_and_openai_shaped_errors(api_schema, service):
    headers = {"Authorization": f"Bearer {service['key']}"}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    labels = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "GET /v1/usage"} <= labels
    statuses: dict[str, Counter] = {}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            statuses[f"{op.method.upper()} {op.path} {mode.value}"] = _fuzz_operation(
                op, mode, headers, service["root"])
    print("\n" + "\n".join(f"{label}: {dict(sorted(c.items()))}" for label, c in statuses.items()))
    # The fuzz reached the engine, not only the validators.
    for path in ("/v1/chat/completions", "/v1/completions"):
        positive = statuses[f"POST {path} positive"]
        assert positive["200"] + positive["200 stream"] >= 5 and positive["200 stream"] >= 1, statuses
    assert sum(sum(c.values()) for c in statuses.values()) >= 200


# Requests no schema generator sends: not JSON, not UTF-8, too big, unauthenticated, wrong method.
_CHAT = '"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4' % SIM_MODEL
HOSTILE = [
    ("POST", "/v1/chat/completions", b"{" + _CHAT.encode() + b', "temperature": NaN}', 400),
    ("POST", "/v1/chat/completions", b"{" + _CHAT.encode() + b', "extra": [Infinity]}', 400),
    ("POST", "/v1/completions", b'{"model": "%s", "prompt": "hi", "top_p": -Infinity}' % SIM_MODEL.encode(), 400),
    ("POST", "/v1/chat/completions", b"", 400),
    ("POST", "/v1/chat/completions", b"null", 400),
    ("POST", "/v1/chat/completions", b"\xff\xfe\x00garbage", 400),
    ("POST", "/v1/chat/completions", b'{"model": "\xc3\x28", "messages": []}', 400),
    ("POST", "/v1/completions", b'{"model": "%s", "prompt": "lone \\ud800 surrogate"}' % SIM_MODEL.encode(), 400),
    ("POST", "/v1/chat/completions", b"[" * 50_000, 400),
    ("POST", "/v1/completions", b'{"model": "%s", "prompt": [4294967296]}' % SIM_MODEL.encode(), 400),
    ("POST", "/v1/completions", b'{"model": "%s", "prompt": [2147483647]}' % SIM_MODEL.encode(), 400),
    ("POST", "/v1/completions", b'{"model": "%s", "prompt": "x", "max_tokens": 1e400}' % SIM_MODEL.encode(), 400),
    ("POST", "/v1/completions", b'{"model": "%s", "prompt": "x", "seed": -9223372036854775809}'
     % SIM_MODEL.encode(), 400),
    ("POST", "/inference/v1/chat/completions", b"{" + _CHAT.encode() + b', "n": 1000}', 400),
    ("POST", "/v1/chat/completions", b'{"model": "%s", "messages": [{"role": "tool", "content": "x"}]}'
     % SIM_MODEL.encode(), 400),
    ("POST", "/v1/completions", b'{"model": "%s", "prompt": "%s"}' % (SIM_MODEL.encode(), b"a" * 70_000), 413),
    ("GET", "/v1/chat/completions", b"", 405),
    ("DELETE", "/v1/models", b"", 405),
    ("GET", "/v1/nowhere", b"", 404),
]


@pytest.mark.parametrize("method,path,body,status", HOSTILE, ids=[f"{m} {p} {s}" for m, p, _, s in HOSTILE])
def test_hostile_requests_get_clean_openai_errors(service, method, path, body, status):
    headers = {"Authorization": f"Bearer {service['key']}", "Content-Type": "application/json"}
    resp = httpx.request(method, service["root"] + path, content=body, headers=headers, timeout=60)
    assert resp.status_code == status, resp.text[:500]
    assert_error_shape(resp.json())


def test_chunked_body_over_the_limit_is_413(service):
    def chunks():
        yield b'{"model": "%s", "prompt": "' % SIM_MODEL.encode()
        for _ in range(20):
            yield b"a" * 8192  # no Content-Length: the ingress must count as it reads
        yield b'"}'

    resp = httpx.post(service["root"] + "/v1/completions", content=chunks(), timeout=60,
                      headers={"Authorization": f"Bearer {service['key']}"})
    assert resp.status_code == 413, resp.text[:500]
    assert_error_shape(resp.json())


@pytest.mark.parametrize("method,path,auth", [
    ("POST", "/v1/chat/completions", None),
    ("POST", "/v1/completions", "Bearer"),
    ("GET", "/v1/models", "Basic " + DEMO_KEY),
    ("GET", "/v1/usage", "bearer  " + "x" * 5000),
    ("POST", "/v1/chat/completions", "Bearer \u00e9t\u00e9".encode()),  # raw UTF-8 bytes
])
def test_bad_credentials_are_401_in_the_openai_shape(service, method, path, auth):
    headers = {"Authorization": auth} if auth is not None else {}
    body = b"{" + _CHAT.encode() + b"}" if method == "POST" else None
    resp = httpx.request(method, service["root"] + path, content=body, headers=headers, timeout=60)
    # Bad keys from one address are throttled (429) after a few; other tests send some too.
    assert resp.status_code == 401 or (resp.status_code == 429 and resp.json()["error"]["code"]
                                       == "too_many_auth_failures"), resp.text[:500]
    assert_error_shape(resp.json())


@pytest.mark.parametrize("literal", [b"Infinity", b"1e999"])
def test_admin_refuses_non_finite_spend_limits(service, literal):
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    account = "fuzz-inf-" + secrets.token_hex(4)
    body = b'{"id": "%s", "monthly_spend_limit_usd": %s}' % (account.encode(), literal)
    resp = httpx.post(service["root"] + "/admin/accounts", content=body, headers=admin, timeout=30)
    assert resp.status_code == 400, resp.text[:500]
    assert_error_shape(resp.json())

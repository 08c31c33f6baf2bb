"""POST /v1/embeddings over real Ray Serve (SimEngine), through the official openai SDK.

Every body is validated against the official shapes (the SDK-derived schema for embeddings, the
OpenAPI subset for errors); usage and the ledger must equal what the engine counted.
"""

from __future__ import annotations

import base64
import math
import struct

import httpx
import openai
import pytest

from tests.conftest import DEMO_KEY

EMB = "accounts/ember/models/demo-sim-embed"
PLAIN = "accounts/ember/models/embed-plain"
LIMITED = "accounts/ember/models/embed-limited"
CHAT = "accounts/ember/models/chat-sim"
DIMS, CONTEXT, MAX_INPUTS = 64, 64, 8
PRICE = 1000.0  # USD per 1M input tokens: large, so that costs are visible
LIMIT = 300


def _model(mid: str, **kw) -> dict:
    return {"id": mid, "context_length": CONTEXT, "num_replicas": 1, "resources": {"num_cpus": 0.05},
            "engine": {"kind": "sim"}, **kw}


def _config(model_dir) -> dict:
    emb = {"task": "embed", "path": str(model_dir)}
    bounds = {"prompt": LIMIT, "uncached": LIMIT, "generated": LIMIT}
    return {
        "models": [
            _model(EMB, **emb, embedding={"dimensions": DIMS, "matryoshka": True, "max_inputs": MAX_INPUTS},
                   pricing={"embedding": {"input": PRICE}}),
            _model(PLAIN, **emb, embedding={"dimensions": 32}),
            _model(LIMITED, **emb, embedding={"dimensions": 16}, limits={"floor": bounds, "ceiling": bounds}),
            _model(CHAT),
        ],
        "ingress": {"num_cpus": 0.05},
    }


@pytest.fixture(scope="module")
def app(serve_instance, demo_model_dir):
    from ray import serve

    from cluster.builder import build_app

    serve.run(build_app(_config(demo_model_dir)), name="embed", route_prefix="/embed")
    yield f"{serve_instance}/embed/v1"
    serve.delete("embed")


@pytest.fixture()
def client(app):
    return openai.OpenAI(base_url=app, api_key=DEMO_KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def tokens(demo_model_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(demo_model_dir / "tokenizer.json"))
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def _raw(client, **body) -> dict:
    raw = client.embeddings.with_raw_response.create(**body)
    return raw.http_response.json()


def _norm(v):
    return math.sqrt(sum(x * x for x in v))


def test_strings_and_token_ids_embed_deterministically_with_schema_valid_bodies(client, tokens, sdk_schemas):
    valid = sdk_schemas("CreateEmbeddingResponse")
    texts = ["the quick brown fox", "jumps over", "the quick brown fox"]
    body = _raw(client, model=EMB, input=texts, encoding_format="float")
    valid.validate(body)
    assert body["object"] == "list" and body["model"] == EMB
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    vecs = [d["embedding"] for d in body["data"]]
    assert all(len(v) == DIMS and math.isclose(_norm(v), 1.0, rel_tol=1e-9) for v in vecs)
    assert vecs[0] == vecs[2] and vecs[0] != vecs[1]
    n = sum(len(tokens(t)) for t in texts)
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}

    one = client.embeddings.create(model=EMB, input=texts[1], encoding_format="float")
    assert one.data[0].embedding == vecs[1]
    by_ids = client.embeddings.create(model=EMB, input=tokens(texts[1]), encoding_format="float")
    assert by_ids.data[0].embedding == vecs[1]
    many = client.embeddings.create(model=EMB, input=[tokens(texts[0]), tokens(texts[1])], encoding_format="float")
    assert [d.embedding for d in many.data] == vecs[:2]


def test_base64_is_little_endian_float32_and_the_sdk_default_decodes_it(client, sdk_schemas):
    floats = client.embeddings.create(model=EMB, input="hello there", encoding_format="float").data[0].embedding
    body = _raw(client, model=EMB, input="hello there", encoding_format="base64")
    packed = base64.b64decode(body["data"][0]["embedding"])
    decoded = list(struct.unpack(f"<{len(packed) // 4}f", packed))
    assert decoded == pytest.approx(floats, abs=1e-6) and len(decoded) == DIMS
    body["data"][0]["embedding"] = decoded  # the schema describes the decoded vector
    sdk_schemas("CreateEmbeddingResponse").validate(body)
    default = client.embeddings.create(model=EMB, input="hello there")  # the SDK asks for base64
    assert default.data[0].embedding == pytest.approx(floats, abs=1e-6)


def test_dimensions_truncate_and_renormalise_where_the_model_allows_it(client):
    full = client.embeddings.create(model=EMB, input="matryoshka", encoding_format="float").data[0].embedding
    short = client.embeddings.create(model=EMB, input="matryoshka", dimensions=16,
                                     encoding_format="float").data[0].embedding
    head = full[:16]
    assert short == pytest.approx([x / _norm(head) for x in head]) and math.isclose(_norm(short), 1.0)
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=PLAIN, input="matryoshka", dimensions=16)
    assert e.value.body["param"] == "dimensions" and "dimensions" in e.value.body["message"]


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["fine", ""]}, "input"),
    ({"input": [[]]}, "input"),
    ({"input": ["x"] * (MAX_INPUTS + 1)}, "input"),
    ({"input": "word " * (CONTEXT + 10)}, "input"),
    ({"input": [[999_999]]}, "input"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "dimensions": -1}, "dimensions"),
    ({"input": "x", "dimensions": 0}, "dimensions"),
    ({"input": "x", "dimensions": DIMS + 1}, "dimensions"),
    ({"model": CHAT, "input": "x"}, "model"),
])
def test_bad_input_is_an_openai_shaped_400(app, openai_schemas, body, param):
    r = httpx.post(f"{app}/embeddings", json={"model": EMB, **body},
                   headers={"Authorization": f"Bearer {DEMO_KEY}"}, timeout=30)
    assert r.status_code == 400, r.text
    openai_schemas("ErrorResponse").validate(r.json())
    assert r.json()["error"]["param"] == param


def test_generation_on_an_embedding_model_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=EMB, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["param"] == "model" and "embedding model" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=EMB, prompt="hi")


def test_usage_and_the_ledger_equal_what_the_engine_counted(client):
    def usage_row():
        rows = client.get("/usage", cast_to=httpx.Response).json()["data"]
        return next((r for r in rows if r["model"] == EMB), {"requests": 0, "prompt_tokens": 0,
                                                             "completion_tokens": 0, "cost_usd": 0.0})

    before = usage_row()
    counted = 0
    for text in ("one input", ["two", "inputs here"], "three"):
        counted += client.embeddings.create(model=EMB, input=text).usage.prompt_tokens
    after = usage_row()
    assert after["requests"] - before["requests"] == 3
    assert after["prompt_tokens"] - before["prompt_tokens"] == counted
    assert after["completion_tokens"] == before["completion_tokens"]
    assert after["cost_usd"] - before["cost_usd"] == pytest.approx(counted * PRICE / 1e6)


def test_embeddings_spend_the_prompt_budget_and_then_get_429(client):
    raw = client.embeddings.with_raw_response.create(model=LIMITED, input="spend the prompt budget " * 4)
    assert int(raw.headers["x-ratelimit-limit-tokens-prompt"]) == LIMIT
    used = raw.parse().usage.prompt_tokens
    assert int(raw.headers["x-ratelimit-remaining-tokens-prompt"]) <= LIMIT - used
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(LIMIT // used + 5):
            client.embeddings.create(model=LIMITED, input="spend the prompt budget " * 4)
    assert e.value.body["param"] == "prompt"


def test_the_responses_api_on_an_embedding_model_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=EMB, input="hi")
    assert e.value.body["param"] == "model"

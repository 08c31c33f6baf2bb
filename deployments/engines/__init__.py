"""Engines behind one protocol; ``make_engine`` picks one from config."""

from __future__ import annotations

from cluster.config import ModelConfig
from deployments.engines.protocol import Engine


def make_engine(model: ModelConfig) -> Engine:
    if model.engine.kind == "sim":
        from deployments.engines.sim import SimEngine

        return SimEngine(model.model_dir, model.engine, model.context_length, embedding=model.embedding)
    from deployments.engines.vllm_engine import VLLMEngine

    return VLLMEngine(model.model_dir, model.engine, model.context_length, embedding=model.embedding)

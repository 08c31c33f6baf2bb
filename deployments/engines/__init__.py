"""Engines behind one protocol; ``make_engine`` picks one from config."""

from __future__ import annotations

from cluster.config import ModelConfig
from deployments.engines.protocol import Engine


def make_engine(model: ModelConfig) -> Engine:
    """The pool replica's engine, running up to ``max_num_seqs`` plus the fair-share headroom
    (``EngineConfig.engine_max_num_seqs``): the ingress's gate decides who runs in that headroom."""
    cfg = model.engine.model_copy(update={"max_num_seqs": model.engine.engine_max_num_seqs,
                                          "fair_share_headroom": 0.0})
    if cfg.kind == "sim":
        from deployments.engines.sim import SimEngine

        return SimEngine(model.model_dir, cfg, model.context_length, embedding=model.embedding)
    from deployments.engines.vllm_engine import VLLMEngine

    return VLLMEngine(model.model_dir, cfg, model.context_length, embedding=model.embedding)

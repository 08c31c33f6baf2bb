"""``POST /v1/embeddings``: the request model, its serving class and its renderer.

An embedding request goes through the same lifecycle as a generation request (admission on the
prompt budgets, a gate slot, one dispatch, settlement exactly once): ``EmbeddingServing`` turns
the body into a ``Job`` whose engine request is an ``EmbedRequest`` (every input tokenized here,
at the ingress, so that admission knows the count), and ``EmbeddingRenderer`` renders the
engine's vectors in OpenAI's shape.

``encoding_format: base64`` is OpenAI's: each vector's little-endian float32 bytes, base64
encoded (the ``openai`` SDK asks for it by default and decodes it itself). ``dimensions``
truncates each vector to its first ``dimensions`` components and normalises it again, which is
only meaningful for a model trained for it (Matryoshka representation learning): the model's
config says so (``embedding.matryoshka``), and any other model answers ``dimensions`` with 400.
"""

from __future__ import annotations

import base64
import math
import struct
from typing import Literal, Union

from pydantic import Field, field_validator

from deployments.engines.protocol import EmbedRequest, EngineOutput, Usage
from deployments.errors import bad_request
from deployments.openai_api import TokenId, _Body
from deployments.serving import AFFINITY_HEADER, Job, Renderer, _Serving
from policies.affinity import session_key
from policies.tiers import ENGINE_PRIORITY


class EmbeddingRequest(_Body):
    model: str = Field(min_length=1, max_length=512)
    # A string, a list of strings, a list of token ids, or a list of token-id lists.
    input: Union[str, list[str], list[TokenId], list[list[TokenId]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=512)

    @field_validator("input")
    @classmethod
    def _not_empty(cls, v):
        if isinstance(v, str) or (isinstance(v, list) and v and isinstance(v[0], int)):
            v = [v]
        if not v:
            raise ValueError("input must not be empty")
        if any(len(item) == 0 for item in v):
            raise ValueError("input must not contain an empty string or an empty token list")
        return v  # always a list of inputs, each a string or a token-id list


def normalized_prefix(vector: list[float], dimensions: int) -> list[float]:
    """The first ``dimensions`` components, scaled back to unit length (Matryoshka truncation).

    Example: ``[0.6, 0.0, 0.8]`` to 2 dimensions is ``[0.6, 0.0]`` scaled by 1/0.6: ``[1.0, 0.0]``.
    """
    head = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in head)) or 1.0
    return [x / norm for x in head]


def encode_base64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: the vector as little-endian float32 bytes, base64 encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def embedding_usage(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "total_tokens": u.prompt_tokens}


class EmbeddingRenderer(Renderer):
    def __init__(self, rid: str, model_id: str, dimensions: int | None, encoding_format: str):
        super().__init__(rid, model_id)
        self.dimensions = dimensions
        self.encoding_format = encoding_format

    def response(self, outs: list[EngineOutput], usage: Usage, n: int) -> dict:
        vectors = next(o.embeddings for o in reversed(outs) if o.embeddings is not None)
        data = []
        for i, vec in enumerate(vectors):
            if self.dimensions is not None and self.dimensions < len(vec):
                vec = normalized_prefix(vec, self.dimensions)
            data.append({"object": "embedding", "index": i,
                         "embedding": encode_base64(vec) if self.encoding_format == "base64" else vec})
        return {"object": "list", "data": data, "model": self.model_id, "usage": embedding_usage(usage)}


class EmbeddingServing(_Serving):
    def prepare(self, rid: str, account: str, body: bytes, headers) -> Job:
        req = EmbeddingRequest.model_validate_json(body)
        model = self._model_for(req.model, account)
        emb = model.embedding
        assert emb is not None  # model_for hands out embedding models only
        if len(req.input) > emb.max_inputs:
            raise bad_request(f"input holds {len(req.input)} items; this model takes at most {emb.max_inputs} "
                              "per request", param="input")
        if req.dimensions is not None:
            if not emb.matryoshka:
                raise bad_request(f"{model.id} does not support `dimensions`: its vectors have "
                                  f"{emb.dimensions} dimensions and cannot be shortened", param="dimensions")
            if req.dimensions > emb.dimensions:
                raise bad_request(f"dimensions is {req.dimensions}; {model.id} has at most {emb.dimensions}",
                                  param="dimensions")
        builder = self.prompts[model.id]
        vocab = builder.vocab_size()
        inputs: list[list[int]] = []
        for i, item in enumerate(req.input):
            if isinstance(item, str):
                ids = builder.text(item)
            else:
                if any(t >= vocab for t in item):
                    raise bad_request(f"input[{i}] holds token ids outside the vocabulary (size {vocab})",
                                      param="input")
                ids = list(item)
            if not ids:
                raise bad_request(f"input[{i}] is empty", param="input")
            if len(ids) > model.context_length:
                raise bad_request(f"input[{i}] is {len(ids)} tokens; this model's maximum context length is "
                                  f"{model.context_length} tokens", param="input", code="context_length_exceeded")
            inputs.append(ids)
        rid = "embd-" + rid
        session = session_key(account, header=headers.get(AFFINITY_HEADER), user=req.user, prompt_ids=inputs[0])
        return Job(
            model=model,
            engine_request=EmbedRequest(rid, inputs, priority=ENGINE_PRIORITY["standard"]),
            session=session,
            stream=False,
            include_usage=False,
            perf_in_body=False,
            billed_tier="standard",
            renderer=EmbeddingRenderer(rid, model.id, req.dimensions, req.encoding_format),
        )

"""Regenerate ``openai-sdk-schemas.json``: JSON Schemas of the embeddings and Responses API shapes.

The OpenAPI subset beside it (``openai-subset.json``) holds no embeddings or Responses schemas, so
these come from the official ``openai`` Python SDK, whose types are generated from OpenAI's
OpenAPI description (Apache-2.0, see LICENSE-openai-python). Run it after upgrading the SDK:

    python -m tests.openai_schema.sdk_schemas

The file holds the shared ``$defs`` and one root per shape: ``CreateEmbeddingResponse``,
``Response`` and ``ResponseStreamEvent`` (every streamed event type, one ``anyOf``).
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

OUT = Path(__file__).with_name("openai-sdk-schemas.json")


def build() -> dict:
    from openai.types import CreateEmbeddingResponse
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import BaseModel

    class Roots(BaseModel):
        CreateEmbeddingResponse: CreateEmbeddingResponse
        Response: Response
        ResponseStreamEvent: ResponseStreamEvent

    schema = Roots.model_json_schema()
    return {
        "source": f"openai-python {version('openai')} types (generated from OpenAI's OpenAPI description)",
        "licence": "Apache-2.0, see LICENSE-openai-python",
        "roots": schema["properties"],
        "$defs": schema["$defs"],
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(build(), indent=1, sort_keys=True) + "\n")
    print(OUT)

"""What Serve's proxy (``deployments.proxy_guard``) and the ingress both read off the wire.

Kept free of Ray, pydantic and the rest of Ember, so the proxy imports only this.

- ``peek_model``: a request's model id without parsing its body.
- The *hold* headers: on a 429 that will hold for a while, the ingress tells the proxy for how
  long (``HOLD_HEADER``, seconds) and, when the refusal is for one model only (a rate limit),
  which (``HOLD_MODEL_HEADER``). The proxy then answers that key's requests (for that model) with
  the same 429 itself until then, and strips both headers before the response leaves.
"""

from __future__ import annotations

import re

HOLD_HEADER = "x-ember-hold-key-s"
HOLD_MODEL_HEADER = "x-ember-hold-model"

# An unescaped "model" key: inside a JSON string every quote is escaped, so this is a key.
_MODEL_KEY = re.compile(rb'(?<!\\)"model"\s*:\s*"([^"\\]{1,512})"')


def peek_model(body: bytes) -> str | None:
    """The request's model id without parsing the body, if exactly one "model" key holds a plain
    string (a nested "model" key, e.g. in a JSON schema, makes it ambiguous: None)."""
    found = _MODEL_KEY.findall(body)
    return found[0].decode("utf-8", "replace") if len(found) == 1 else None


def hold_headers(seconds: float, model_id: str | None = None) -> dict[str, str]:
    if seconds <= 0:
        return {}
    held = {HOLD_HEADER: f"{seconds:.3f}"}
    if model_id is not None:
        held[HOLD_MODEL_HEADER] = model_id
    return held

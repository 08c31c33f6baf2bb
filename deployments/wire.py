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

_KEY = b'"model"'
_VALUE = re.compile(rb'\s*:\s*"([^"\\]{1,512})"')


def peek_model(body: bytes) -> str | None:
    """The request's model id without parsing the body, if exactly one "model" key holds a plain
    string (a nested "model" key, e.g. in a JSON schema, makes it ambiguous: None).

    An unescaped ``"model"`` is a key or a whole string value: inside a JSON string every quote is
    escaped. The occurrences are found with ``bytes.find`` (a 2 MiB body takes well under a
    millisecond; a regular expression over the whole body took ~50 ms on the proxy's event loop).
    """
    found: bytes | None = None
    at = body.find(_KEY)
    while at >= 0:
        if at == 0 or body[at - 1] != 0x5C:  # not preceded by a backslash
            value = _VALUE.match(body, at + len(_KEY))
            if value is not None:
                if found is not None:
                    return None
                found = value.group(1)
        at = body.find(_KEY, at + len(_KEY))
    return found.decode("utf-8", "replace") if found is not None else None


def hold_headers(seconds: float, model_id: str | None = None) -> dict[str, str]:
    if seconds <= 0:
        return {}
    held = {HOLD_HEADER: f"{seconds:.3f}"}
    if model_id is not None:
        held[HOLD_MODEL_HEADER] = model_id
    return held

"""peek_model: a request's model id read off the raw body, which the proxy and the ingress trust
only when it is unambiguous."""

import json

import pytest

from deployments.wire import hold_headers, peek_model


@pytest.mark.parametrize("body, model", [
    (b'{"model": "a/b", "messages": []}', "a/b"),
    (b'{"messages": [], "model" : "m1" }', "m1"),
    # The key's text inside a string is escaped, so it is not the key.
    (b'{"messages": [{"role": "user", "content": "say \\"model\\": \\"evil\\""}], "model": "ok"}', "ok"),
    # A nested "model" key (in a JSON schema) makes it ambiguous.
    (b'{"model": "x", "response_format": {"schema": {"model": "y"}}}', None),
    (b'{"model": 5}', None),
    (b'{}', None),
    (b'"model"', None),
    (b"", None),
])
def test_peek_model(body, model):
    assert peek_model(body) == model


def test_peek_model_agrees_with_json_on_a_large_body():
    body = json.dumps({"messages": [{"role": "user", "content": "spam"}] * 60_000,
                       "model": "accounts/ember/models/big", "max_tokens": 1}).encode()
    assert len(body) > 2_000_000 and peek_model(body) == json.loads(body)["model"]


def test_hold_headers():
    assert hold_headers(0.0, "m") == {}
    assert hold_headers(0.5) == {"x-ember-hold-key-s": "0.500"}
    assert hold_headers(1.0, "a/b") == {"x-ember-hold-key-s": "1.000", "x-ember-hold-model": "a/b"}

"""Telemetry's pure parts: how a settled request is classified, and tracing off by default."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from cluster.config import EmberConfig, TracingConfig
from deployments.errors import ApiError, overloaded
from deployments.telemetry import CLIENT_CLOSED, IngressTelemetry, _status_of, _trace_id, tracing_exporter

CONFIG = {"models": [{"id": "accounts/ember/models/x"}], "observability": {"metrics": {"enabled": False}}}


@pytest.mark.parametrize("outcome, final, expected", [
    (None, object(), (200, "")),
    (None, None, (CLIENT_CLOSED, "client_closed")),  # the response ended before the final output
    (asyncio.CancelledError(), None, (CLIENT_CLOSED, "client_closed")),
    (ApiError(429, "limited", type="rate_limit_error", code="rate_limit_exceeded", param="uncached"), None,
     (429, "uncached")),
    (ApiError(429, "busy", type="rate_limit_error", code="concurrency_limit_exceeded"), None,
     (429, "concurrency_limit_exceeded")),
    (overloaded("accounts/ember/models/x", 3.0), None, (503, "overloaded")),
    (RuntimeError("boom"), None, (500, "internal_error")),
])
def test_a_settled_request_gets_its_status_and_reason(outcome, final, expected):
    status, reason = _status_of(outcome, SimpleNamespace(final=final))
    assert status == expected[0]
    if expected[0] != 500:
        assert reason == expected[1]


def test_tracing_is_off_by_default_and_creates_no_span(monkeypatch):
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert tracing_exporter(TracingConfig()) == "none"
    tel = IngressTelemetry(EmberConfig.model_validate(CONFIG))
    assert tel.tracer is None
    life = SimpleNamespace(span=None)
    assert tel.dispatched(life) is None and life.span is None


def test_the_environment_chooses_the_exporter_when_the_config_does_not(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console,otlp")
    assert tracing_exporter(TracingConfig()) == "console"
    assert tracing_exporter(TracingConfig(exporter="none")) == "none"


def test_an_untraced_request_logs_the_callers_trace_id():
    life = SimpleNamespace(span=None, traceparent="00-" + "ab" * 16 + "-" + "cd" * 8 + "-01")
    assert _trace_id(life) == "ab" * 16
    assert _trace_id(SimpleNamespace(span=None, traceparent="garbage")) is None

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


class _RecordingCounter:
    """Stands in for Ray's ``Counter`` (which needs a Ray worker): keeps each ``inc``."""

    def __init__(self, tag_keys):
        self._tag_keys = tag_keys
        self.calls: list[tuple[float, dict]] = []

    def inc(self, value, tags):
        self.calls.append((value, tags))


def test_counts_are_summed_per_label_set_and_handed_on_once_a_second():
    from deployments.telemetry import _Counts

    now = [100.0]
    counts = _Counts(clock=lambda: now[0])
    c = _RecordingCounter(("model", "status"))
    for _ in range(5):
        counts.add(c, ("m", "200"), 1.0)
    counts.add(c, ("m", "429"), 2.0)
    assert c.calls == []  # nothing reaches Ray on the request's path within the second
    now[0] += _Counts.FLUSH_S
    counts.add(c, ("m", "200"), 1.0)  # the first add after a second hands the sums on
    assert sorted(c.calls, key=lambda call: call[1]["status"]) == [
        (6.0, {"model": "m", "status": "200"}), (2.0, {"model": "m", "status": "429"})]
    counts.add(c, ("m", "200"), 3.0)
    counts.flush()
    assert c.calls[-1] == (3.0, {"model": "m", "status": "200"})
    counts.flush()  # nothing new: no call
    assert len(c.calls) == 3


def _settled(i: int):
    return SimpleNamespace(outcome=None, final=None, job=None, usage=None, checked_model=None, account=f"a{i}",
                           started=0.0, slotted_at=0.0, queued_at=0.0, span=None, traceparent=None,
                           prompt_body=None)


@pytest.fixture
def request_lines():
    import logging

    from deployments.telemetry import request_log

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    keep = Keep()
    level = request_log.level
    request_log.addHandler(keep)
    request_log.setLevel(logging.INFO)
    yield keep.messages
    request_log.removeHandler(keep)
    request_log.setLevel(level)


def test_settled_requests_are_logged_later_in_one_write_off_the_response_path(request_lines, monkeypatch):
    import json

    monkeypatch.setattr(IngressTelemetry, "RECORD_DELAY_S", 0.05)
    tel = IngressTelemetry(EmberConfig.model_validate(CONFIG))

    async def settle_three():
        for i in range(3):
            tel.finished(_settled(i))
        assert request_lines == []  # not on the path of the response that settled them
        await asyncio.sleep(0.2)

    asyncio.run(settle_three())
    assert len(request_lines) == 1  # one write for the batch
    records = [json.loads(line) for line in request_lines[0].split("\n")]
    assert [r["account"] for r in records] == ["a0", "a1", "a2"]
    assert {r["status"] for r in records} == {CLIENT_CLOSED}


def test_a_long_backlog_is_recorded_in_slices_and_flush_records_the_rest(request_lines, monkeypatch):
    monkeypatch.setattr(IngressTelemetry, "RECORD_DELAY_S", 60.0)  # only the backlog rule or flush
    monkeypatch.setattr(IngressTelemetry, "RECORD_BACKLOG", 10)
    monkeypatch.setattr(IngressTelemetry, "RECORD_SLICE", 4)
    tel = IngressTelemetry(EmberConfig.model_validate(CONFIG))

    async def settle(n):
        for i in range(n):
            tel.finished(_settled(i))
        for _ in range(6):  # a slice per turn of the loop
            await asyncio.sleep(0)

    asyncio.run(settle(10 + 3))
    assert [len(m.split("\n")) for m in request_lines] == [4, 4, 4, 1]
    tel.finished(_settled(99))  # no running loop: recorded at once
    assert request_lines[-1].count("\n") == 0 and '"account":"a99"' in request_lines[-1]
    tel._pending.append((_settled(100), 0.0, None))
    tel.flush()
    assert '"account":"a100"' in request_lines[-1]

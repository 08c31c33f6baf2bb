"""Batch input validation, dispatch order and the adaptive window (policies/batch.py)."""

from __future__ import annotations

import json

import pytest

from policies.batch import Pacer, Signal, Window, can_move, dispatch_order, parse_input

EP = "/v1/chat/completions"


def line(cid, model="m", system="S", q="q", **extra):
    body = {"model": model, "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}]}
    return json.dumps({"custom_id": cid, "method": "POST", "url": EP, "body": body, **extra})


def parse(*lines, max_lines=100, max_bytes=1 << 20):
    return parse_input("\n".join(lines).encode(), EP, max_lines, max_bytes)


def test_a_good_file_parses_into_lines_with_one_model():
    p = parse(line("a"), line("b"), "")
    assert not p.errors and p.model == "m"
    assert [(ln.index, ln.custom_id) for ln in p.lines] == [(0, "a"), (1, "b")]


@pytest.mark.parametrize("bad, code", [
    ("{not json", "invalid_json_line"),
    ("[1, 2]", "invalid_json_line"),
    (json.dumps({"method": "POST", "url": EP, "body": {"model": "m"}}), "missing_custom_id"),
    (line("a"), "duplicate_custom_id"),
    (line("z", model="other"), "mismatched_model"),
    (line("z", url="/v1/completions"), "mismatched_endpoint"),
    (line("z", method="GET"), "invalid_method"),
    (json.dumps({"custom_id": "z", "body": "text"}), "invalid_body"),
    (json.dumps({"custom_id": "z", "body": {"messages": []}}), "missing_model"),
])
def test_each_bad_line_is_reported_with_its_line_number(bad, code):
    p = parse(line("a"), line("b"), bad)
    assert [(e.line, e.code) for e in p.errors] == [(3, code)]


def test_limits_on_lines_and_bytes_fail_the_whole_file():
    assert parse(line("a"), line("b"), max_lines=1).errors[0].code == "too_many_requests"
    assert parse(line("a"), max_bytes=10).errors[0].code == "file_too_large"
    assert parse("").errors[0].code == "empty_file"


def test_lines_sharing_a_system_prompt_are_dispatched_together_in_first_seen_order():
    p = parse(line("a", system="X"), line("b", system="Y"), line("c", system="X"), line("d", system="Y", q="other"))
    assert [ln.custom_id for ln in dispatch_order(p.lines)] == ["a", "c", "b", "d"]
    assert len({ln.group for ln in p.lines}) == 2


@pytest.mark.parametrize("old, new, ok", [
    ("validating", "in_progress", True), ("validating", "failed", True), ("in_progress", "finalizing", True),
    ("finalizing", "completed", True), ("in_progress", "cancelling", True), ("cancelling", "cancelled", True),
    ("in_progress", "expired", True), ("completed", "cancelling", False), ("failed", "in_progress", False),
])
def test_state_transitions(old, new, ok):
    assert can_move(old, new) is ok


def test_window_doubles_per_round_until_the_first_back_off_then_creeps_and_halves():
    w = Window(2.0, 64)
    for _ in range(2 + 4):  # two rounds: 2 → 4 → 8
        w.on_success(0)
    assert w.limit == 8
    w.on_success(interactive_waiting=1)  # an interactive request waits: halve, slow start over
    assert w.limit == 4
    for _ in range(5):  # about a window of successes adds one line (4 → 5.1)
        w.on_success(0)
    assert w.limit == 5
    w.on_busy()
    assert w.limit == 2
    for _ in range(5):
        w.on_busy()
    assert w.limit == 1
    capped = Window(2.0, 8)
    for _ in range(100):
        capped.on_success(0)
    assert capped.limit == 8


def test_batch_leaves_headroom_for_interactive_arrivals():
    from policies.tiers import shed, usable_slots

    assert usable_slots("batch", 32, 0.0, 0.25) == 24
    assert usable_slots("standard", 32, 0.0, 0.25) == 32
    assert usable_slots("batch", 32, 0.25, 0.25) == 16
    # 24 in flight: a Standard request still starts, a batch line is refused at once.
    assert shed("standard", 24, 32, 0.5, 2.0, 4.0, 0.0, None, 0.25).admit
    assert not shed("batch", 24, 32, 0.5, 2.0, 4.0, 0.0, None, 0.25).admit
    assert shed("batch", 23, 32, 0.5, 2.0, 4.0, 0.0, None, 0.25).admit


def _filled(window: Window, in_flight: int = 0, now: float = 0.0, pacer: Pacer | None = None) -> int:
    """How many lines may start at ``now`` with ``in_flight`` running (each start recorded)."""
    n = 0
    while pacer.may_start(now, in_flight + n):
        pacer.started(now)
        n += 1
    return n


def test_batch_fills_an_idle_pool_up_to_its_window():
    pacer = Pacer(Window(24.0, 64), quiet_s=1.0, trickle_s=1.0)
    pacer.observe(0.0, Signal())  # nobody interactive, ever
    assert _filled(pacer.window, pacer=pacer) == 24
    pacer.observe(5.0, Signal(interactive=0, waiting=0, idle_s=3.0))  # the last one left 3 s ago
    assert _filled(pacer.window, in_flight=20, now=5.0, pacer=pacer) == 4


def test_batch_yields_to_interactive_traffic_down_to_a_trickle_and_fills_again_once_it_is_gone():
    pacer = Pacer(Window(24.0, 64), quiet_s=1.0, trickle_s=1.0)
    pacer.observe(10.0, Signal(interactive=2))
    assert pacer.busy(10.0)
    assert _filled(pacer.window, in_flight=23, now=10.0, pacer=pacer) == 0  # drain first
    assert _filled(pacer.window, in_flight=0, now=10.5, pacer=pacer) == 1  # then one line
    pacer.observe(10.9, Signal(interactive=1))  # it finished; interactive requests still run
    assert _filled(pacer.window, in_flight=0, now=10.9, pacer=pacer) == 0  # not before trickle_s
    pacer.observe(11.0, Signal(interactive=1))
    assert pacer.next_start_s(11.0) == 0.5
    assert _filled(pacer.window, in_flight=1, now=11.5, pacer=pacer) == 0  # one at a time
    assert _filled(pacer.window, in_flight=0, now=11.5, pacer=pacer) == 1
    # The last interactive request ended 0.4 s before this report: quiet from 12.6 on.
    pacer.observe(12.0, Signal(interactive=0, idle_s=0.4))
    assert pacer.busy(12.5) and not pacer.busy(12.6)
    assert _filled(pacer.window, in_flight=0, now=12.6, pacer=pacer) == 24  # the window is kept
    assert pacer.next_start_s(12.6) == 0.0


def test_an_interactive_queue_also_halves_the_window():
    pacer = Pacer(Window(24.0, 64), quiet_s=1.0, trickle_s=1.0)
    pacer.observe(0.0, Signal(waiting=3))
    assert pacer.window.limit == 12 and pacer.busy(0.5)
    assert Signal.from_dict(None) == Signal() and Signal.from_dict({"interactive": 2}).interactive == 2


def test_the_window_starts_at_the_capacity_the_gate_reports_and_never_grows_past_it():
    pacer = Pacer(Window(2.0, 64), quiet_s=1.0, trickle_s=1.0)
    pacer.observe(0.0, Signal(capacity=32))
    assert _filled(pacer.window, pacer=pacer) == 32  # no slow start to probe for it
    for _ in range(100):
        pacer.window.on_success(0)
        pacer.observe(0.0, Signal(capacity=32))
    assert pacer.window.limit == 32
    pacer.window.on_busy()  # a rate limit refused a line: halve, then creep back
    pacer.observe(0.0, Signal(capacity=32))
    assert pacer.window.limit == 16
    pacer.observe(0.0, Signal(capacity=8))  # a replica left
    assert pacer.window.limit == 8
    assert Signal.from_dict({"capacity": 24}).capacity == 24 and Signal.from_dict({}).capacity is None


def test_a_success_reported_after_the_capacity_does_not_take_the_window_past_it():
    # The runner observes the gate's signal, then counts the line's success: the window must stay
    # at the capacity, or the next line is refused at the gate and the window halves.
    pacer = Pacer(Window(2.0, 64), quiet_s=1.0, trickle_s=1.0)
    pacer.observe(0.0, Signal(capacity=32))
    for _ in range(5):
        pacer.window.on_success(0)
    assert pacer.window.limit == 32 and pacer.window.slow_start
    pacer.observe(0.0, Signal(capacity=40))  # a replica joined: room to grow again
    pacer.window.on_busy()  # 20, then one line per window of successes
    limits = []
    for _ in range(2000):
        pacer.window.on_success(0)
        limits.append(pacer.window.limit)
    assert max(limits) == limits[-1] == 40

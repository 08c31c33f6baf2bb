"""Batch input validation, dispatch order and the adaptive window (policies/batch.py)."""

from __future__ import annotations

import json

import pytest

from policies.batch import Window, can_move, dispatch_order, parse_input

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

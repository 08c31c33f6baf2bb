"""Batch jobs: input validation, state rules, prefix grouping and adaptive concurrency. Pure.

States (OpenAI's names; Fireworks' in brackets, accepted as aliases in the docs):

    validating [VALIDATING] → in_progress [PENDING/RUNNING] → finalizing → completed [COMPLETED]
    validating → failed [FAILED]                 (the file is refused, with line-numbered errors)
    in_progress → expired [EXPIRED]              (the window passed; completed lines are kept)
    validating | in_progress → cancelling → cancelled [CANCELLED]   (completed lines are kept)

Worked example of the concurrency window (``Window``): it starts at 2 lines in flight and, like
TCP's slow start, adds one line per success until the first back-off (2 → 4 → 8 per round of
lines), so an idle pool fills within a few rounds. A refused slot, or any interactive request
waiting at the pool gate, halves it at once (16 → 8, never below 1) and ends the slow start; from
then on a whole window of successes adds one line (8 → 9 after 8 successes): batch backs off
within one line's time of an interactive queue forming and creeps back.

Yielding to interactive traffic (``Pacer``): the window is how much batch may run on an idle
pool. But on a pool where interactive requests run, batch lines cost them more than slots: each
line's handling (proxy, ingress, replica, runner) takes CPU and engine steps that interactive
requests then wait for, even with free slots. So batch fills the pool only while it is idle: no
interactive request has run for ``quiet_s``. While one runs (or ran within ``quiet_s``), batch
yields: at most one line in flight, started at most every ``trickle_s``, so that a batch still
moves on a pool that is never idle. Worked example (quiet 1 s, trickle 1 s): 24 lines in flight
on an idle pool; an interactive request arrives at t=10.0; the next line to finish reports it,
and nothing new starts until the in-flight lines have drained, then one line per second; the
interactive load stops at t=30.0; from t=31.0 the window (kept at 24) fills the pool again.
The gate also reports how many slots batch may hold (``Signal.capacity``); the window starts
there instead of probing for it, and never grows past it, so that batch is not refused (and
halved) for asking more than the pool has. A line that an interactive request preempted at the
gate (``deployments.pool_gate``) does not halve it either: the pacing already yields.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
TERMINAL = ("completed", "failed", "expired", "cancelled")
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "validating": ("in_progress", "failed", "cancelling"),
    "in_progress": ("finalizing", "cancelling", "expired"),
    "finalizing": ("completed", "expired"),
    "cancelling": ("cancelled",),
}
FIREWORKS_ALIASES = {"VALIDATING": "validating", "PENDING": "in_progress", "RUNNING": "in_progress",
                     "COMPLETED": "completed", "FAILED": "failed", "EXPIRED": "expired",
                     "CANCELLED": "cancelled"}
MAX_ERRORS = 100  # line errors reported per file; the count of the rest is in the last one


def can_move(old: str, new: str) -> bool:
    return new in TRANSITIONS.get(old, ())


@dataclass(frozen=True, slots=True)
class LineError:
    line: int  # 1-based, as editors count
    code: str
    message: str
    param: str | None = None

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True, slots=True)
class Line:
    index: int  # 0-based position in the file
    custom_id: str
    body: dict
    group: str  # lines with the same group share a prompt prefix


@dataclass
class ParsedInput:
    lines: list[Line] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    model: str | None = None


def prefix_group(body: dict) -> str:
    """A key shared by lines whose prompts start alike: the model plus the system messages of a
    chat (or, with none, the first message), or the first 512 characters of a completion prompt.

    >>> a = prefix_group({"model": "m", "messages": [{"role": "system", "content": "S"},
    ...                                             {"role": "user", "content": "q1"}]})
    >>> a == prefix_group({"model": "m", "messages": [{"role": "system", "content": "S"},
    ...                                               {"role": "user", "content": "q2"}]})
    True
    """
    msgs = body.get("messages")
    if isinstance(msgs, list):
        head = [m for m in msgs if isinstance(m, dict) and m.get("role") in ("system", "developer")] or msgs[:1]
        key = json.dumps(head, sort_keys=True, default=str)
    else:
        prompt = body.get("prompt")
        key = prompt[:512] if isinstance(prompt, str) else json.dumps(prompt, default=str)[:512]
    return hashlib.sha256(f"{body.get('model')}\x00{key}".encode()).hexdigest()[:16]


def parse_input(data: bytes, endpoint: str, max_lines: int, max_bytes: int) -> ParsedInput:
    """Check a batch input file's shape: limits, JSON, ``custom_id``, method, url, one model.

    The bodies themselves are checked by the request models of the endpoint (the caller does that
    for each line of ``lines``). Errors are line-numbered; a file with any error runs nothing.
    """
    out = ParsedInput()
    if len(data) > max_bytes:
        out.errors.append(LineError(0, "file_too_large", f"the file is {len(data)} bytes; the limit is {max_bytes}"))
        return out
    raw_lines = data.decode("utf-8", "replace").splitlines()
    while raw_lines and not raw_lines[-1].strip():
        raw_lines.pop()
    if not raw_lines:
        out.errors.append(LineError(0, "empty_file", "the file holds no requests"))
        return out
    if len(raw_lines) > max_lines:
        out.errors.append(LineError(0, "too_many_requests",
                                    f"the file holds {len(raw_lines)} requests; the limit is {max_lines}"))
        return out
    seen: dict[str, int] = {}
    for n, text in enumerate(raw_lines, start=1):
        err = _check_line(n, text, endpoint, seen, out)
        if err is not None:
            out.errors.append(err)
    if len(out.errors) > MAX_ERRORS:
        more = len(out.errors) - MAX_ERRORS
        out.errors = out.errors[:MAX_ERRORS] + [LineError(0, "more_errors", f"{more} more lines have errors")]
    return out


def _check_line(n: int, text: str, endpoint: str, seen: dict[str, int], out: ParsedInput) -> LineError | None:
    try:
        obj = json.loads(text)
    except ValueError as exc:
        return LineError(n, "invalid_json_line", f"line {n} is not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return LineError(n, "invalid_json_line", f"line {n} is not a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return LineError(n, "missing_custom_id", f"line {n} has no custom_id (a non-empty string)", "custom_id")
    if cid in seen:
        return LineError(n, "duplicate_custom_id", f"line {n}: custom_id {cid!r} is also on line {seen[cid]}",
                         "custom_id")
    seen[cid] = n
    if obj.get("method", "POST") != "POST":
        return LineError(n, "invalid_method", f"line {n}: method must be POST", "method")
    if obj.get("url", endpoint) != endpoint:
        return LineError(n, "mismatched_endpoint",
                         f"line {n}: url {obj.get('url')!r} differs from the batch's endpoint {endpoint}", "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        return LineError(n, "invalid_body", f"line {n}: body must be a JSON object", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return LineError(n, "missing_model", f"line {n}: body.model is required", "body.model")
    if out.model is None:
        out.model = model
    elif model != out.model:
        return LineError(n, "mismatched_model",
                         f"line {n}: model {model!r} differs from {out.model!r}; a batch uses one model",
                         "body.model")
    if body.get("stream"):
        return LineError(n, "invalid_body", f"line {n}: stream is not supported in a batch", "body.stream")
    out.lines.append(Line(n - 1, cid, body, prefix_group(body)))
    return None


def dispatch_order(lines: list[Line]) -> list[Line]:
    """Lines of one prefix group together, groups in order of first appearance (stable), so that
    a group's lines reach its replica back to back and hit the prefix its first line cached."""
    first: dict[str, int] = {}
    for ln in lines:
        first.setdefault(ln.group, ln.index)
    return sorted(lines, key=lambda ln: (first[ln.group], ln.index))


@dataclass
class Window:
    """Additive-increase, multiplicative-decrease limit on lines in flight (see the module doc)."""

    size: float
    max: int
    min: int = 1
    slow_start: bool = True  # until the first back-off: one more line per success
    ceiling: float | None = None  # slots the gate says batch may hold (None: not known)

    @property
    def top(self) -> float:
        return float(self.max) if self.ceiling is None else min(float(self.max), self.ceiling)

    @property
    def limit(self) -> int:
        return max(self.min, min(int(self.top), int(self.size)))

    def on_success(self, interactive_waiting: int) -> None:
        if interactive_waiting > 0:
            self.on_busy()
            return
        step = 1.0 if self.slow_start else 1.0 / max(1.0, self.size)
        self.size = min(self.top, self.size + step)

    def on_busy(self) -> None:
        self.slow_start = False
        self.size = max(float(self.min), self.size / 2)


@dataclass(frozen=True, slots=True)
class Signal:
    """A pool's interactive traffic as one ingress's gate sees it (priority and standard tiers)."""

    interactive: int = 0  # interactive requests holding a slot now
    waiting: int = 0  # interactive requests waiting for a slot
    idle_s: float = float("inf")  # seconds since one last held a slot (0 while any does)
    capacity: int | None = None  # slots batch may hold in the whole pool (None: not known)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Signal":
        d = d or {}
        cap = d.get("capacity")
        return cls(int(d.get("interactive", 0)), int(d.get("waiting", 0)), float(d.get("idle_s", float("inf"))),
                   None if cap is None else int(cap))


@dataclass
class Pacer:
    """When batch lines may start: the window on an idle pool, a trickle beside interactive
    traffic (see the module doc). ``now`` is any monotonic clock, passed in."""

    window: Window
    quiet_s: float = 1.0
    trickle_s: float = 1.0
    busy_until: float = float("-inf")  # interactive traffic seen: batch yields until then
    last_start: float = float("-inf")

    def observe(self, now: float, signal: Signal) -> None:
        if signal.capacity is not None:
            # The gate says how many slots batch may hold: no need to probe for them (a refusal
            # would halve the window), so the window starts there and never grows past it.
            cap = float(max(self.window.min, signal.capacity))
            self.window.ceiling = cap
            self.window.size = cap if self.window.slow_start else min(self.window.size, cap)
        if signal.waiting > 0:
            self.window.on_busy()
        if signal.interactive > 0 or signal.waiting > 0:
            self.busy_until = max(self.busy_until, now + self.quiet_s)
        elif signal.idle_s < self.quiet_s:
            self.busy_until = max(self.busy_until, now + self.quiet_s - signal.idle_s)

    def busy(self, now: float) -> bool:
        return now < self.busy_until

    def may_start(self, now: float, in_flight: int) -> bool:
        if not self.busy(now):
            return in_flight < self.window.limit
        return in_flight == 0 and now >= self.last_start + self.trickle_s

    def started(self, now: float) -> None:
        self.last_start = now

    def next_start_s(self, now: float) -> float:
        """Seconds until a line may start, if none is in flight (0: now)."""
        return max(0.0, self.last_start + self.trickle_s - now) if self.busy(now) else 0.0


def expired(created_at: float, window_s: float, now: float) -> bool:
    return now >= created_at + window_s

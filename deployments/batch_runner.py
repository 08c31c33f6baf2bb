"""The batch runner: takes batches from the store and runs their lines through an ingress.

It keeps nothing that matters in memory. Each active batch's state is in the store (its status
and, per finished line, its result), so a runner that dies and restarts (a Serve replica
replaced, or the ingress process it runs in) picks every batch up where the store says it is:

- a line has a result → it is never run again;
- a line without one is run (again) under a fresh engine request id (the runner's epoch and a
  counter), while its op id (``<batch>-<line>``, what the ledger dedupes on) stays the same, so
  a line whose earlier attempt was still running (the runner, a replica or the ingress died) is
  billed once and its result stored once (``BatchStore.complete_line`` refuses a second).

The ingress stores a line's result and bills it in one step (``BatchApi.run_line``): billed
exactly when stored. Exactly once, then, is what the store records: each line's result once and
its usage once. An attempt cut off mid-run may have cost engine time that nobody pays for.

Cancel and expiry stop the lines still running (an unfinished line is not billed). Finalizing
seals the batch's results first (a line that finishes after that is refused and not billed),
has the ingress bill any stored answer whose usage event is missing (``BatchApi.reconcile``: an
ingress died between storing and billing), and only then writes the output from the store.

Admission: lines go to the ingress's ``batch_lines`` (a few per call) (``deployments.batch_api``), which runs them
through the request lifecycle at tier ``batch``. A line refused there (no free slot, a rate or
spend limit: ``busy``) goes back to the head of the queue without costing an attempt; the window
of lines in flight (``policies.batch.Window``) halves on any refusal and whenever interactive
requests wait at the pool's gate, and grows slowly while they do not. Batch never waits in a
queue in front of anyone. And it runs on idle capacity (``policies.batch.Pacer``): every answer
carries the gate's interactive traffic (``batch_signal``, asked directly while few lines run);
while interactive requests run, or ran within ``batch.quiet_s``, at most one line is in flight,
one every ``batch.trickle_s``, and the window fills the pool again once they are gone.

Prefix affinity: lines are dispatched grouped by prompt prefix (``policies.batch.dispatch_order``)
with the group as their session key, so a group's lines reach the same replica. A group's first
line runs alone; the rest follow once it has finished, when its prefix is in that replica's cache.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
import uuid
from typing import Any

from cluster.blobs import BlobStore
from cluster.config import BatchConfig
from cluster.stores import BatchStore
from deployments.batch_api import BUSY, LOST
from policies.batch import Line, Pacer, Signal, Window, dispatch_order, expired, parse_input

log = logging.getLogger("ember.batch")


class BatchRunner:
    """``executor`` has ``batch_validate(batch_id)``, ``batch_lines(account, endpoint, batch_id,
    [(index, custom_id, body, session)], attempt)``, ``batch_signal(model_id)`` and
    ``batch_reconcile(batch_id)``: an ``Ingress``
    in process, or ``HandleExecutor`` over its handle."""

    def __init__(self, cfg: BatchConfig, store: BatchStore, blobs: BlobStore, executor: Any, clock=time.time):
        self.cfg = cfg
        self.store = store
        self.blobs = blobs
        self.executor = executor
        self.clock = clock
        self._tasks: dict[str, asyncio.Task] = {}
        self._wake = asyncio.Event()
        self._main: asyncio.Task | None = None
        self.window = Window(float(cfg.start_concurrency), cfg.max_concurrency)
        self.pacer = Pacer(self.window, cfg.quiet_s, cfg.trickle_s)
        self._signal_every_s = max(0.05, cfg.quiet_s / 2)  # while yielding: ask this often
        self.epoch = uuid.uuid4().hex[:8]
        self._attempts = itertools.count(1)

    def start(self) -> None:
        if self._main is None or self._main.done():
            self._wake = asyncio.Event()
            self._main = asyncio.get_running_loop().create_task(self.run_forever(), name="ember-batch-runner")

    def kick(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        for t in [self._main, *self._tasks.values()]:
            if t is not None:
                t.cancel()
        await asyncio.gather(*[t for t in [self._main, *self._tasks.values()] if t is not None],
                             return_exceptions=True)

    async def run_forever(self) -> None:
        while True:
            try:
                for batch_id in await self.store.active_batches():
                    task = self._tasks.get(batch_id)
                    if task is None or task.done():
                        self._tasks[batch_id] = asyncio.get_running_loop().create_task(
                            self._run_guarded(batch_id), name=f"ember-batch-{batch_id}")
            except Exception:  # the store is down: try again on the next round
                log.warning("batch runner: cannot list active batches", exc_info=True)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.cfg.poll_interval_s)
            except TimeoutError:
                pass

    async def _run_guarded(self, batch_id: str) -> None:
        try:
            await self.run_batch(batch_id)
        except asyncio.CancelledError:
            raise
        except Exception:  # picked up again on the next poll
            log.exception("batch %s: runner step failed; retrying", batch_id)
            await asyncio.sleep(self.cfg.poll_interval_s)

    async def run_batch(self, batch_id: str) -> None:
        rec = await self.store.get_batch(None, batch_id)
        if rec is None:
            return
        if rec["status"] == "validating":
            rec = await self.executor.batch_validate(batch_id) or await self.store.get_batch(None, batch_id)
        if rec["status"] == "in_progress":
            await self._run_lines(rec)
            rec = await self.store.get_batch(None, batch_id)
        if rec["status"] in ("finalizing", "cancelling"):
            await self._finalize(rec)
        elif rec["status"] == "in_progress" and expired(rec["created_at"], self.cfg.completion_window_s,
                                                         self.clock()):
            await self._finalize(rec, expire=True)

    async def _lines(self, rec: dict) -> list[Line]:
        data = await asyncio.to_thread(self.blobs.get, rec["input_file_id"])
        parsed = await asyncio.to_thread(parse_input, data, rec["endpoint"], self.cfg.max_lines,
                                         self.cfg.max_file_bytes)
        return dispatch_order(parsed.lines)

    async def _run_lines(self, rec: dict) -> None:
        batch_id = rec["id"]
        done = set(await self.store.line_results(batch_id))
        every = await self._lines(rec)
        pending = collections.deque(ln for ln in every if ln.index not in done)
        warm = {ln.group for ln in every if ln.index in done}  # groups whose prefix a finished line cached
        leading: set[str] = set()  # groups whose first line is running
        losses: dict[int, int] = {}
        running: dict[asyncio.Task, list[Line]] = {}  # calls in flight, each with its lines
        in_flight = 0  # lines
        hold_until = 0.0
        next_check = next_signal = 0.0
        stopping = False
        pacer = self.pacer
        await self._observe(rec, await self._signal(rec))  # the pool's capacity and traffic, before the first line
        try:
            while pending or running:
                now = time.monotonic()
                if now >= next_check:  # cancelled or expired meanwhile? then finish what runs, start nothing
                    cur = await self.store.get_batch(None, batch_id)
                    stopping = cur is None or cur["status"] != "in_progress" or expired(
                        rec["created_at"], self.cfg.completion_window_s, self.clock())
                    next_check = now + self.cfg.poll_interval_s
                if stopping:  # cancelled or expired: lines still running stop too (unbilled: unfinished)
                    pending.clear()
                    for task in running:
                        task.cancel()
                if pacer.busy(now) and now >= next_signal and pending and not stopping:
                    # Yielding: few lines report back, so ask the ingress whether interactive
                    # traffic is still there.
                    await self._observe(rec, await self._signal(rec))
                    now = time.monotonic()
                    next_signal = now + self._signal_every_s
                while pending and not stopping and now >= hold_until and pacer.may_start(now, in_flight):
                    # Up to lines_per_call lines in one call to the ingress (fewer calls, less
                    # handling per line), as many as the pacing lets start now.
                    call: list[Line] = []
                    while len(call) < self.cfg.lines_per_call and pacer.may_start(now, in_flight + len(call)):
                        line = _next_line(pending, warm, leading)
                        if line is None:
                            break
                        if line.group not in warm:
                            leading.add(line.group)
                        call.append(line)
                    if not call:
                        break
                    pacer.started(now)
                    in_flight += len(call)
                    running[asyncio.get_running_loop().create_task(self._attempt(rec, call))] = call
                wait_s = self.cfg.poll_interval_s
                if pacer.busy(now):
                    wait_s = min(wait_s, max(0.0, next_signal - now), pacer.next_start_s(now) or wait_s)
                if not running:
                    await asyncio.sleep(max(0.01, wait_s if hold_until <= now else min(wait_s, hold_until - now)))
                    continue
                finished, _ = await asyncio.wait(running, timeout=max(0.01, wait_s),
                                                 return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    call = running.pop(task)
                    in_flight -= len(call)
                    outcomes = task.result() if not task.cancelled() and task.exception() is None else [
                        {"outcome": LOST}] * len(call)
                    for line, outcome in zip(call, outcomes):
                        leading.discard(line.group)
                        await self._observe(rec, outcome.get("signal"))
                        if outcome["outcome"] == "done":
                            warm.add(line.group)
                            if not pacer.busy(time.monotonic()):
                                self.window.on_success(0)
                            continue
                        if stopping:
                            continue
                        if outcome["outcome"] == BUSY:
                            if not outcome.get("preempted"):  # preempted: the pacing yields already
                                self.window.on_busy()
                            hold_until = time.monotonic() + min(self.cfg.busy_backoff_s, outcome.get(
                                "retry_after_s") or self.cfg.busy_backoff_s)
                            pending.appendleft(line)
                            continue
                        losses[line.index] = losses.get(line.index, 0) + 1
                        if losses[line.index] >= self.cfg.max_attempts:
                            await self.store.complete_line(batch_id, line.index, _error_line(
                                rec, line, "attempts_exhausted",
                                f"the line failed {losses[line.index]} times as its replica or ingress failed"), True)
                        else:
                            pending.appendleft(line)
        finally:
            for task in running:
                task.cancel()
        if not stopping:
            await self.store.update_batch(batch_id, {"status": "finalizing", "finalizing_at": int(self.clock())},
                                          expect=("in_progress",))

    async def _attempt(self, rec: dict, call: list[Line]) -> list[dict]:
        # A fresh engine request id per attempt (this runner's epoch and a counter, with the op
        # id), while the op id the ledger dedupes on stays ``<batch>-<line>``.
        attempt = f"{self.epoch}.{next(self._attempts)}"
        try:
            return await self.executor.batch_lines(
                rec["account"], rec["endpoint"], rec["id"],
                [(ln.index, ln.custom_id, ln.body, f"batch:{rec['id']}:{ln.group}") for ln in call], attempt)
        except Exception as exc:  # the ingress died or is restarting: the lines run again
            log.warning("batch %s: a call of %d lines (attempt %s) was lost: %r", rec["id"], len(call), attempt, exc)
            return [{"outcome": LOST}] * len(call)

    async def _signal(self, rec: dict) -> dict | None:
        try:
            return await self.executor.batch_signal(rec.get("model"))
        except Exception:  # the ingress is restarting: keep yielding until it answers
            return {"interactive": 1}

    async def _observe(self, rec: dict, signal: dict | None) -> None:
        if signal is None:
            return
        sig = Signal.from_dict(signal)
        if not self.cfg.yield_to_interactive:  # only an interactive queue holds batch back
            sig = Signal(waiting=sig.waiting)
        self.pacer.observe(time.monotonic(), sig)

    async def _finalize(self, rec: dict, expire: bool = False) -> None:
        """Write the output and error files and move to the final state. Idempotent: the files'
        ids come from the batch's, so a runner that died half-way rewrites the same ones."""
        batch_id = rec["id"]
        # Sealed first: a line still finishing now (cancel stopped it too late) is refused, so
        # is not billed, and every result stored so far is in the files written below. Then any
        # stored answer whose usage event an ingress did not write before it died is billed.
        await self.store.seal_lines(batch_id)
        billed = await self.executor.batch_reconcile(batch_id)
        if billed:
            log.warning("batch %s: billed %d stored lines whose usage event was missing", batch_id, billed)
        results = await self.store.line_results(batch_id)
        ok = [r for _, r in sorted(results.items()) if r["error"] is None and r["response"]["status_code"] == 200]
        bad = [r for _, r in sorted(results.items()) if r not in ok]
        changes: dict = {"request_counts": {"total": (rec.get("request_counts") or {}).get("total", len(results)),
                                            "completed": len(ok), "failed": len(bad)}}
        hexid = batch_id.removeprefix("batch_")
        for key, name, rows in (("output_file_id", f"file-{hexid}-output", ok), ("error_file_id", f"file-{hexid}-errors", bad)):
            if not rows:
                continue
            data = b"".join(_jsonl(r) for r in rows)
            await asyncio.to_thread(self.blobs.put, name, data)
            await self.store.put_file({"id": name, "account": rec["account"], "bytes": len(data),
                                       "created_at": int(self.clock()), "filename": f"{batch_id}_{key[:-8]}.jsonl",
                                       "purpose": "batch_output"})
            changes[key] = name
        now = int(self.clock())
        if expire:
            changes.update(status="expired", expired_at=now)
            await self.store.update_batch(batch_id, changes, expect=("in_progress", "finalizing"))
        elif rec["status"] == "cancelling":
            changes.update(status="cancelled", cancelled_at=now)
            await self.store.update_batch(batch_id, changes, expect=("cancelling",))
        else:
            changes.update(status="completed", completed_at=now)
            await self.store.update_batch(batch_id, changes, expect=("finalizing",))


def _next_line(pending: collections.deque, warm: set[str], leading: set[str]) -> Line | None:
    """The first pending line that may start: its group is warm (its prefix is cached), or no
    line of its group is running yet (it leads). Lines of a group whose leader runs wait."""
    for i, line in enumerate(pending):
        if line.group in warm or line.group not in leading:
            del pending[i]
            return line
        if i > 256:  # a long run of waiting followers: leave them; more will be startable soon
            return None
    return None


def _error_line(rec: dict, line: Line, code: str, message: str) -> dict:
    return {"id": f"batch_req_{rec['id']}-{line.index}", "custom_id": line.custom_id, "response": None,
            "error": {"code": code, "message": message}}


def _jsonl(obj: dict) -> bytes:
    import json

    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


class HandleExecutor:
    """The runner's steps through the ingress deployment's handle (any replica)."""

    def __init__(self, handle):
        self.handle = handle

    async def batch_validate(self, batch_id: str):
        return await self.handle.batch_validate.remote(batch_id)

    async def batch_lines(self, *args):
        return await self.handle.batch_lines.remote(*args)

    async def batch_reconcile(self, batch_id: str) -> int:
        return await self.handle.batch_reconcile.remote(batch_id)

    async def batch_signal(self, model_id: str | None) -> dict:
        return await self.handle.batch_signal.remote(model_id)

"""The Files and Batches API (OpenAI's shape), and the two steps the batch runner asks of an ingress.

HTTP: ``POST/GET /v1/files``, ``GET/DELETE /v1/files/{id}``, ``GET /v1/files/{id}/content``,
``POST/GET /v1/batches``, ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``. Every record
is scoped to the caller's account: another account's file or batch is 404.

For the runner (``deployments.batch_runner``), called through the ingress's handle or in process:

- ``validate(batch_id)``: the input file against OpenAI's limits and Ember's request models (the
  same parsing as an interactive request), then ``in_progress`` or ``failed`` with line-numbered
  errors. Nothing is billed for a failed file: nothing ran.
- ``run_lines(...)``/``run_line(...)``: a few lines at once (one call from the runner), each through the request's lifecycle (``RequestLife``: spend and rate
  limits, the pool gate, the replica, settlement and billing) as tier ``batch``: lowest engine
  priority, a slot only when one is free (refused at once otherwise, never queued or shed), its
  result stored and billed in one step (at the batch discount under the line's op id, so that a
  retried line is billed once), so that a line is billed exactly when its result is stored.
- ``reconcile(batch_id)``: before the output is written, bills any stored answer whose usage
  event is missing (an ingress died between storing and billing it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cluster.blobs import BlobStore
from cluster.config import EmberConfig
from cluster.stores import TERMINAL_BATCH_STATES, BatchStore
from deployments.errors import ApiError, bad_request, batch_conflict, not_found
from deployments.lifecycle import RequestLife, Runtime
from deployments.serving import AFFINITY_HEADER, dumps
from policies.batch import ENDPOINTS, LineError, parse_input

log = logging.getLogger("ember.batch")

VALIDATE_STEP = 8  # lines checked between yields to the event loop (about 1 ms each)
FILE_PURPOSES = ("batch", "batch_output")
# The outcome of a line that did not finish: try it again later (the runner decides when).
BUSY = "busy"  # refused before it ran: no free slot, a rate or spend limit; costs no attempt
LOST = "lost"  # its replica or stream failed while it ran


def file_object(rec: dict) -> dict:
    return {"id": rec["id"], "object": "file", "bytes": rec["bytes"], "created_at": rec["created_at"],
            "filename": rec["filename"], "purpose": rec["purpose"], "status": "processed"}


def batch_object(rec: dict, counts: tuple[int, int] | None = None) -> dict:
    """The OpenAI Batch object of a stored record; ``counts`` (completed, failed) are live ones."""
    rc = dict(rec.get("request_counts") or {"total": 0, "completed": 0, "failed": 0})
    if counts is not None:
        rc["completed"], rc["failed"] = counts
    keys = ("id", "endpoint", "input_file_id", "completion_window", "status", "output_file_id", "error_file_id",
            "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
            "expired_at", "cancelling_at", "cancelled_at", "metadata", "errors", "model")
    # Unset optional fields are left out (OpenAI's schema types them without null); metadata may be null.
    out = {k: rec.get(k) for k in keys if rec.get(k) is not None or k == "metadata"}
    out["object"] = "batch"
    out["request_counts"] = rc
    return out


def _list_body(data: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def _limit(request: Request, default: int, most: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise bad_request(f"limit must be an integer from 1 to {most}", param="limit")
    return int(raw)


class BatchApi:
    def __init__(self, config: EmberConfig, batches: BatchStore, blobs: BlobStore, rt: Runtime,
                 servings: dict[str, Any], account_of, read_body, kick=None):
        """``servings``: endpoint path → serving class; ``account_of(request)`` authenticates;
        ``read_body(request, limit)`` reads a body within a size limit; ``kick()`` tells the
        runner that a batch is waiting (it polls anyway)."""
        self.config = config
        self.cfg = config.batch
        self.store = batches
        self.blobs = blobs
        self.rt = rt
        self.servings = servings
        self._account_of = account_of
        self._read_body = read_body
        self._kick = kick
        self._steps: set[asyncio.Task] = set()  # store-and-bill steps of lines whose caller left

    def routes(self) -> dict:
        """(method, path tail) → handler(request, rid, *path params)."""
        return {
            ("POST", "files"): self.create_file,
            ("GET", "files"): self.list_files,
            ("GET", "files/*"): self.get_file,
            ("DELETE", "files/*"): self.delete_file,
            ("GET", "files/*/content"): self.file_content,
            ("POST", "batches"): self.create_batch,
            ("GET", "batches"): self.list_batches,
            ("GET", "batches/*"): self.get_batch,
            ("POST", "batches/*/cancel"): self.cancel_batch,
        }

    # -- files -----------------------------------------------------------------------------

    async def create_file(self, request: Request, rid: str) -> Response:
        account = await self._account_of(request)
        limit = self.cfg.max_file_bytes + 64 * 1024  # room for the multipart envelope
        body = await self._read_body(request, limit)
        form = await _form(request, body)
        purpose = form.get("purpose")
        upload = form.get("file")
        if purpose != "batch":
            raise bad_request("purpose must be 'batch' (the only purpose Ember accepts uploads for)", param="purpose")
        if upload is None or isinstance(upload, str):
            raise bad_request("a file part named 'file' is required", param="file")
        data = await upload.read()
        if len(data) > self.cfg.max_file_bytes:
            raise ApiError(413, f"the file is {len(data)} bytes; the limit is {self.cfg.max_file_bytes}",
                           code="file_too_large", param="file")
        now = time.time()
        rec = {"id": "file-" + uuid.uuid4().hex[:24], "account": account, "bytes": len(data),
               "created_at": int(now), "created_us": int(now * 1e6), "filename": upload.filename or "upload.jsonl", "purpose": purpose}
        await asyncio.to_thread(self.blobs.put, rec["id"], data)
        await self.store.put_file(rec)
        return JSONResponse(file_object(rec))

    async def list_files(self, request: Request, rid: str) -> Response:
        account = await self._account_of(request)
        page, more = await self.store.list_files(account, request.query_params.get("after"),
                                                 _limit(request, 10_000, 10_000), request.query_params.get("purpose"))
        return JSONResponse(_list_body([file_object(r) for r in page], more))

    async def _owned(self, request: Request, kind: str, rid: str) -> tuple[str, dict]:
        """(account, record) of the caller's file or batch; another account's is 404 too."""
        account = await self._account_of(request)
        rec = await (self.store.get_file if kind == "file" else self.store.get_batch)(account, rid)
        if rec is None:
            raise not_found(f"no {kind} with id '{rid}'", param=f"{kind}_id", code=f"{kind}_not_found")
        return account, rec

    async def _file(self, request: Request, file_id: str) -> tuple[str, dict]:
        return await self._owned(request, "file", file_id)

    async def get_file(self, request: Request, rid: str, file_id: str) -> Response:
        return JSONResponse(file_object((await self._file(request, file_id))[1]))

    async def file_content(self, request: Request, rid: str, file_id: str) -> Response:
        _, rec = await self._file(request, file_id)
        data = await asyncio.to_thread(self.blobs.get, rec["id"])
        return Response(data, media_type="application/jsonl")

    async def delete_file(self, request: Request, rid: str, file_id: str) -> Response:
        account, rec = await self._file(request, file_id)
        await self.store.delete_file(account, file_id)
        await asyncio.to_thread(self.blobs.delete, rec["id"])
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    # -- batches ---------------------------------------------------------------------------

    async def create_batch(self, request: Request, rid: str) -> Response:
        account = await self._account_of(request)
        body = await self._read_body(request, self.config.ingress.max_body_bytes)
        try:
            req = json.loads(body)
        except ValueError:
            raise bad_request("the body is not valid JSON") from None
        if not isinstance(req, dict):
            raise bad_request("the body must be a JSON object")
        endpoint = req.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise bad_request(f"endpoint must be one of {', '.join(ENDPOINTS)}", param="endpoint")
        if req.get("completion_window") != "24h":
            raise bad_request("completion_window must be '24h'", param="completion_window")
        metadata = req.get("metadata")
        if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
                isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                for k, v in metadata.items())):
            raise bad_request("metadata holds at most 16 string pairs (keys up to 64 characters, values up "
                              "to 512)", param="metadata")
        file_id = req.get("input_file_id")
        src = await self.store.get_file(account, file_id) if isinstance(file_id, str) else None
        if src is None:
            raise not_found(f"no file with id '{file_id}'", param="input_file_id", code="file_not_found")
        if src["purpose"] != "batch":
            raise bad_request(f"file {file_id} has purpose '{src['purpose']}', not 'batch'", param="input_file_id")
        now = time.time()
        rec = {"id": "batch_" + uuid.uuid4().hex[:24], "account": account, "endpoint": endpoint,
               "input_file_id": file_id, "completion_window": "24h", "status": "validating",
               "created_at": int(now), "created_us": int(now * 1e6),
               "expires_at": int(now + self.cfg.completion_window_s),
               "metadata": metadata or None, "request_counts": {"total": 0, "completed": 0, "failed": 0}}
        await self.store.put_batch(rec)
        if self._kick is not None:
            self._kick()
        return JSONResponse(batch_object(rec))

    async def _batch(self, request: Request, batch_id: str) -> tuple[str, dict]:
        return await self._owned(request, "batch", batch_id)

    async def _live(self, rec: dict) -> dict:
        live = rec["status"] not in TERMINAL_BATCH_STATES
        return batch_object(rec, await self.store.counts(rec["id"]) if live else None)

    async def get_batch(self, request: Request, rid: str, batch_id: str) -> Response:
        return JSONResponse(await self._live((await self._batch(request, batch_id))[1]))

    async def list_batches(self, request: Request, rid: str) -> Response:
        account = await self._account_of(request)
        page, more = await self.store.list_batches(account, request.query_params.get("after"),
                                                   _limit(request, 20, 100))
        return JSONResponse(_list_body([await self._live(r) for r in page], more))

    async def cancel_batch(self, request: Request, rid: str, batch_id: str) -> Response:
        _, rec = await self._batch(request, batch_id)
        if rec["status"] in ("cancelling", "cancelled"):
            return JSONResponse(await self._live(rec))
        moved = await self.store.update_batch(batch_id, {"status": "cancelling", "cancelling_at": int(time.time())},
                                              expect=("validating", "in_progress"))
        if moved is None:
            now = await self.store.get_batch(None, batch_id) or rec
            raise batch_conflict(batch_id, now["status"], "cancel")
        if self._kick is not None:
            self._kick()
        return JSONResponse(await self._live(moved))

    # -- the runner's steps ------------------------------------------------------------------

    async def validate(self, batch_id: str) -> dict | None:
        """Check a ``validating`` batch's file; move it to ``in_progress`` or ``failed``."""
        rec = await self.store.get_batch(None, batch_id)
        if rec is None or rec["status"] != "validating":
            return rec
        data = await asyncio.to_thread(self.blobs.get, rec["input_file_id"])
        errors, total, model = await self._check(rec, data)
        now = int(time.time())
        if errors:
            return await self.store.update_batch(batch_id, {
                "status": "failed", "failed_at": now,
                "errors": {"object": "list", "data": [e.to_dict() for e in errors]},
                "request_counts": {"total": total, "completed": 0, "failed": 0}}, expect=("validating",))
        return await self.store.update_batch(batch_id, {
            "status": "in_progress", "in_progress_at": now, "model": model,
            "request_counts": {"total": total, "completed": 0, "failed": 0}}, expect=("validating",))

    async def _check(self, rec: dict, data: bytes) -> tuple[list[LineError], int, str | None]:
        """The file's shape (in a thread), then each body through its serving's ``prepare``.

        The bodies are checked here on the event loop, a few lines at a time with a yield between:
        in a thread, this CPU-bound work took the interpreter lock from the event loop for
        seconds (a 10,000-line file stalled interactive requests by up to 4 s)."""
        from deployments.errors import to_error

        parsed = await asyncio.to_thread(parse_input, data, rec["endpoint"], self.cfg.max_lines,
                                         self.cfg.max_file_bytes)
        serving = self.servings[rec["endpoint"]]
        errors = list(parsed.errors)
        for n, line in enumerate(parsed.lines):
            if len(errors) >= 100:
                break
            if n % VALIDATE_STEP == 0:
                await asyncio.sleep(0)  # let requests waiting on this loop go first
            try:
                serving.prepare("validate", rec["account"], dumps(line.body), {})
            except Exception as exc:  # the same refusal an interactive request would get
                err = to_error(exc)
                errors.append(LineError(line.index + 1, err.code or err.type,
                                        f"line {line.index + 1}: {err.message}", err.param))
        errors.sort(key=lambda e: e.line)
        return errors, len(parsed.lines) + len([e for e in parsed.errors if e.line]), parsed.model

    async def run_lines(self, account: str, endpoint: str, batch_id: str, lines: list, attempt: str) -> list[dict]:
        """``run_line`` for each ``(index, custom_id, body, session)`` at once; their outcomes in
        order (a line whose step failed is LOST). One call for a few lines saves the runner and
        this ingress the handling of a call per line."""
        async def one(index: int, custom_id: str, body: dict, session: str) -> dict:
            _own_serve_request_id()
            return await self.run_line(account, endpoint, batch_id, index, custom_id, body, attempt, session)

        outs = await asyncio.gather(*(one(*line) for line in lines), return_exceptions=True)
        for o in outs:
            if not isinstance(o, dict):
                log.warning("batch %s: a line's step failed: %r", batch_id, o, exc_info=o)
        return [o if isinstance(o, dict) else {"outcome": LOST} for o in outs]

    async def run_line(self, account: str, endpoint: str, batch_id: str, index: int, custom_id: str,
                       body: dict, attempt: str, session: str) -> dict:
        """Run one batch line, store its result and bill it, in one step.

        Returns ``{"outcome": "done", "status_code", "stored"}`` (``stored``: False when another
        attempt's result was there first, or the batch's results are sealed) or ``{"outcome": BUSY
        | LOST, "retry_after_s"}`` (BUSY with ``preempted``: the gate took its slot back for an
        interactive request); each with ``signal``, the pool's interactive traffic as this
        ingress sees it (``policies.batch.Signal``), which the runner's pacing follows.

        Once the engine's answer is here, storing the result (``BatchStore.complete_line``) and
        billing it (``RequestLife.settle``, under the op id ``<batch>-<line>``) run to the end
        even if this call is cancelled (the batch was cancelled, the runner died): a line is
        billed exactly when its result is stored. A result refused (sealed: the batch is being
        finalized) is not billed, and a store that cannot be reached bills nothing: the line is
        run again. If this process dies between the two, ``reconcile`` bills the stored result
        when the batch is finalized.
        """
        op_id = f"{batch_id}-{index}"
        rid = f"{op_id}-{attempt}"
        life = RequestLife(self.rt, account, time.perf_counter())
        serving = self.servings[endpoint]
        gate = None
        try:
            job = serving.prepare(rid, account, dumps({**body, "stream": False}), {AFFINITY_HEADER: session})
            life.job = job.as_batch_line(op_id)
            gate = self.rt.gates.get(job.model.id)
            await life.admit()
            await life.take_slot()
            gate.hold_batch(life, _preemptor(life, asyncio.current_task()))
            first = await life.start()
            outs = [out async for out in life.outputs(first)]
        except BaseException as exc:
            life.settle()
            if life.preempted and isinstance(exc, asyncio.CancelledError) and asyncio.current_task().uncancel() == 0:
                # The gate took the slot back for an interactive request: unfinished, so
                # unbilled; the runner runs the line again later, at no cost of an attempt.
                return {"outcome": BUSY, "retry_after_s": 0.0, "preempted": True, "signal": _signal(gate)}
            if not isinstance(exc, Exception):
                raise
            out = self._not_done(exc, gate)
            if out["outcome"] != "done":
                return out
            result = _line_result(op_id, custom_id, out.pop("request_id"), out["status_code"], out.pop("body"))
            out["stored"] = await asyncio.shield(self._step(self._store(None, batch_id, index, result, True)))
            return out
        resp = job.renderer.response(outs, life.usage, job.engine_request.sampling.n)
        result = _line_result(op_id, custom_id, rid, 200, resp)
        # Shielded: a cancel arriving now cancels the wait, not the step, which stores and bills.
        stored = await asyncio.shield(self._step(self._store(life, batch_id, index, result, failed=False)))
        return {"outcome": "done", "status_code": 200, "stored": stored, "signal": _signal(gate)}

    def _step(self, coro) -> asyncio.Task:
        """A task that runs to its end whoever waits for it (held here until then)."""
        task = asyncio.ensure_future(coro)
        self._steps.add(task)
        task.add_done_callback(self._steps.discard)
        return task

    async def _store(self, life: RequestLife | None, batch_id: str, index: int, result: dict, failed: bool) -> bool:
        """Store a line's result, then settle its request: billed only if the result was stored."""
        try:
            stored = await self.store.complete_line(batch_id, index, result, failed)
        except BaseException:
            if life is not None:
                life.settle()  # nothing stored, nothing billed: the runner runs the line again
            raise
        if life is not None:
            life.result_stored = stored
            life.settle()
        return stored

    def signal(self, model_id: str | None) -> dict:
        """The interactive traffic at the model's gate in this ingress (``policies.batch.Signal``)."""
        return _signal(self.rt.gates.get(model_id))

    async def reconcile(self, batch_id: str) -> int:
        """Bill every stored answer of a sealed batch that the ledger lacks; returns how many.

        A result is stored before it is billed, so an ingress that died between the two left a
        stored line without its usage event. Idempotent: the ledger and the outbox dedupe by op
        id, so an event still on its way is not counted twice. Usage comes from the stored body.
        """
        rec = await self.store.get_batch(None, batch_id)
        if rec is None:
            return 0
        answered = {f"{batch_id}-{i}": r for i, r in (await self.store.line_results(batch_id)).items()
                    if r.get("error") is None and (r.get("response") or {}).get("status_code") == 200}
        if not answered:
            return 0
        missing = set(answered) - await self.rt.billing.stores.ledger.recorded(list(answered))
        model = (self.config.model(rec.get("model") or "")
                 or self.config.model(next(iter(answered.values()))["response"]["body"].get("model", "")))
        for op_id in sorted(missing):
            u = answered[op_id]["response"]["body"].get("usage") or {}
            cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            self.rt.billing.bill(op_id, rec["account"], model, "batch", u.get("prompt_tokens", 0), cached,
                                 u.get("completion_tokens", 0))
        return len(missing)

    def _not_done(self, exc: Exception, gate) -> dict:
        from deployments.errors import is_replica_loss, to_error

        if is_replica_loss(exc):
            return {"outcome": LOST, "retry_after_s": 0.0, "signal": _signal(gate)}
        err = to_error(exc)
        if err.status in (402, 429, 503) and err.code not in ("stream_interrupted", "replica_unavailable"):
            retry = float(err.headers.get("Retry-After", "1") or 1)
            return {"outcome": BUSY, "retry_after_s": retry, "signal": _signal(gate)}
        if err.status >= 500:
            return {"outcome": LOST, "retry_after_s": 0.0, "signal": _signal(gate)}
        return {"outcome": "done", "status_code": err.status, "request_id": None, "body": err.body(),
                "signal": _signal(gate)}


def _own_serve_request_id() -> None:
    """Give this task (one line of a call) a Serve request id of its own. Handle calls made
    while serving a request inherit its internal id, so the lines of one call would all reach
    the pool under the same id, and its router (``deployments.affinity_router``), which counts
    each replica's requests by that id, would lose count of them."""
    import dataclasses
    import random

    from ray.serve import context as serve_context

    cur = serve_context._serve_request_context.get()
    if cur is not None and cur._internal_request_id:
        serve_context._serve_request_context.set(dataclasses.replace(
            cur, _internal_request_id=f"{cur._internal_request_id}.{random.getrandbits(64):016x}"))


def _preemptor(life: RequestLife, task: asyncio.Task):
    """What the gate calls to take a batch line's slot back: cancel the line's task, unless its
    answer is already in (then storing and billing it is nearly done: let it finish)."""
    def preempt() -> bool:
        if life.final is not None or life.preempted or task.done():
            return False
        life.preempted = True
        task.cancel()
        return True

    return preempt


def _line_result(op_id: str, custom_id: str, request_id: str | None, status: int, body: dict) -> dict:
    return {"id": f"batch_req_{op_id}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}


def _signal(gate) -> dict:
    """The interactive traffic at a pool's gate, for the runner's pacing (``policies.batch.Signal``)."""
    return {} if gate is None else gate.interactive_signal()


async def _form(request: Request, body: bytes) -> dict:
    """The multipart form of an already-read body (the file part in memory)."""
    from starlette.formparsers import MultiPartParser

    async def stream():
        yield body
        yield b""

    try:
        form = await MultiPartParser(request.headers, stream(), max_part_size=len(body) + 1).parse()
    except Exception as exc:  # malformed multipart: the caller's fault
        raise bad_request(f"the body is not a valid multipart form: {exc}") from None
    return dict(form)

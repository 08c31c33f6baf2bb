"""An ASGI middleware for Serve's HTTP proxy: client control headers out, OpenAI-shaped errors in.

Serve's proxy acts on two headers a client may send before Ember sees the request:
``x-request-timeout-seconds`` (``0`` turns the proxy timeout off) and
``x-request-disconnect-disabled`` (keeps a request running after its client left). They are the
operator's knobs, not the caller's, so this middleware removes them. The proxy also answers some
requests itself (a proxy timeout 408, backpressure or an unavailable deployment 503, an unknown
route 404, an internal error 500) with a plain-text body; this middleware rewrites those bodies
into the OpenAI error shape, keeping the status and headers (``Retry-After``, ``x-request-id``).
Ember's own responses are JSON already and pass untouched.

It also keeps one tenant's misbehaviour in the proxy, where it is cheap, rather than letting it
cross the Ray hop to the ingress:

- **Bodies are read here**, whole, within a deadline (``EMBER_PROXY_BODY_TIMEOUT_S``, 10 s, then
  408) and a size cap (``EMBER_PROXY_MAX_BODY_BYTES``, 4 MiB, then 413), before the request goes
  on. Without this Serve forwards a request at its headers and the ingress pulls every chunk of a
  trickling body through a Ray call, so slow senders cost the ingress (and every tenant on it)
  work per byte. Multipart uploads (files) pass through as a stream.
- **Requests per key** in flight through this proxy are capped (``EMBER_PROXY_MAX_PER_KEY``, 128;
  the key is the ``Authorization`` header's hash, or the client address without one): past it, a
  request waits for a slot of its key (first come, first served) for up to
  ``EMBER_PROXY_REFUSAL_DELAY_S`` (1 s), then gets a 429; at most
  ``EMBER_PROXY_MAX_WAITING_PER_KEY`` (512) wait, past that the 429 is at once.
- **Refusals that hold for a while are repeated here** (the hold headers of ``deployments.wire``
  on a 429): an account refused as a whole (too many large bodies that failed validation) is
  answered here without its bodies being read; a key refused by a model's rate limit is answered
  here for that model (its body read, not forwarded) for as long as the limiter remembers the
  refusal. The headers never reach the caller.
- **Refusals are slow**: a held request is answered when its hold ends or after
  ``EMBER_PROXY_REFUSAL_DELAY_S``, whichever is first, holding its key's slot meanwhile. A client that
  retries a 429 at once (or keeps more connections open than its key may use) then makes one
  request a second per connection instead of hundreds, so its refusals cost the proxy, and the
  tenants beside it on these cores, little. The ``Retry-After`` a client may ignore is enforced.

Serve loads it in the proxy process when ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` is
``deployments.proxy_guard:middlewares`` in the environment of the Ray nodes (``make run`` and the
test suite set it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import time
from collections import OrderedDict, deque

from starlette.middleware import Middleware

from deployments import wire

CALLBACK = "deployments.proxy_guard:middlewares"
STRIPPED = (b"x-request-timeout-seconds", b"x-request-disconnect-disabled")
HOLD = wire.HOLD_HEADER.encode()
HOLD_MODEL = wire.HOLD_MODEL_HEADER.encode()
BODY_METHODS = {"POST", "PUT", "PATCH"}
MAX_HOLDS = 10_000  # keys remembered at once (oldest first out)
_KINDS = {
    404: ("invalid_request_error", "unknown_url"),
    408: ("timeout_error", "timeout"),
    429: ("rate_limit_error", "overloaded"),
    500: ("server_error", "internal_error"),
    503: ("service_unavailable", "overloaded"),
    504: ("timeout_error", "timeout"),
}


def middlewares() -> list[Middleware]:
    return [Middleware(ProxyGuard)]


def openai_error_body(status: int, text: str) -> bytes:
    kind, code = _KINDS.get(status, ("invalid_request_error", None))
    message = text.strip() or f"HTTP {status}"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


def _env_number(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        raise ValueError(f"{name} must be a number, not {os.environ[name]!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive")
    return value


async def _respond(send, status: int, message: str, code: str, kind: str, headers: dict[str, str] | None = None):
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if status in (408, 413):
        raw.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class ProxyGuard:
    def __init__(self, app, clock=time.monotonic):
        self.app = app
        self.clock = clock
        self.body_timeout_s = _env_number("EMBER_PROXY_BODY_TIMEOUT_S", 10.0)
        self.max_body_bytes = int(_env_number("EMBER_PROXY_MAX_BODY_BYTES", 4 * 1024 * 1024))
        self.max_per_key = int(_env_number("EMBER_PROXY_MAX_PER_KEY", 128))
        self.refusal_delay_s = _env_number("EMBER_PROXY_REFUSAL_DELAY_S", 1.0)
        self.max_waiting_per_key = int(_env_number("EMBER_PROXY_MAX_WAITING_PER_KEY", 512))
        self.in_flight: dict[bytes, int] = {}
        self.waiting: dict[bytes, deque[asyncio.Future]] = {}  # key -> requests waiting for its slot
        # (key, model id or None for every model) -> (until, the 429's body)
        self.holds: OrderedDict[tuple[bytes, str | None], tuple[float, bytes]] = OrderedDict()
        self.model_holds: dict[bytes, int] = {}  # key -> how many of its holds are per model

    @staticmethod
    def _key(scope) -> bytes:
        for k, v in scope["headers"]:
            if k.lower() == b"authorization":
                return hashlib.blake2b(v, digest_size=16).digest()
        client = scope.get("client")
        return b"addr:" + (client[0].encode() if client else b"?")

    def _held(self, key: bytes, model: str | None) -> tuple[float, bytes] | None:
        hold = self.holds.get((key, model))
        if hold is not None and hold[0] <= self.clock():
            self._unhold((key, model))
            return None
        return hold

    def _hold(self, key: bytes, model: str | None, seconds: float, body: bytes) -> None:
        if (key, model) not in self.holds and model is not None:
            self.model_holds[key] = self.model_holds.get(key, 0) + 1
        self.holds[(key, model)] = (self.clock() + seconds, body)
        self.holds.move_to_end((key, model))
        while len(self.holds) > MAX_HOLDS:
            self._unhold(next(iter(self.holds)))

    def _unhold(self, hk: tuple[bytes, str | None]) -> None:
        del self.holds[hk]
        key, model = hk
        if model is not None:
            _decrement(self.model_holds, key)

    async def _repeat(self, send, hold: tuple[float, bytes]) -> None:
        wait = str(max(1, math.ceil(hold[0] - self.clock())))
        await send({"type": "http.response.start", "status": 429,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", wait.encode()),
                                (b"content-length", str(len(hold[1])).encode())]})
        await send({"type": "http.response.body", "body": hold[1]})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() not in STRIPPED]
        key = self._key(scope)
        if not await self._acquire(key):
            return await _respond(send, 429, f"too many concurrent requests with this key: at most "
                                             f"{self.max_per_key} at a time", "concurrency_limit_exceeded",
                                  "rate_limit_error", {"Retry-After": "1"})
        try:
            hold = self._held(key, None)
            if hold is not None:
                return await self._refuse_held(send, hold)
            if scope["method"] in BODY_METHODS and not _multipart(scope):
                body = await self._buffered(scope, receive, send)
                if body is None:
                    return
                if key in self.model_holds:
                    hold = self._held(key, wire.peek_model(body))
                    if hold is not None:
                        return await self._refuse_held(send, hold)
                receive = _replay(body, receive)
            await self._forward(scope, receive, send, key)
        finally:
            self._release(key)

    async def _acquire(self, key: bytes) -> bool:
        """A slot of ``key``'s: at once if it has one free, else the first one released within the
        refusal delay (waiters served in order); False if none came."""
        held = self.in_flight.get(key, 0)
        if held < self.max_per_key:
            self.in_flight[key] = held + 1
            return True
        queue = self.waiting.setdefault(key, deque())
        if len(queue) >= self.max_waiting_per_key:
            return False
        slot = asyncio.get_running_loop().create_future()
        queue.append(slot)
        try:
            await asyncio.wait_for(asyncio.shield(slot), self.refusal_delay_s)
        except TimeoutError:
            pass
        except BaseException:  # cancelled while waiting: a slot handed over meanwhile goes on
            if slot.done() and not slot.cancelled():
                self._release(key)
            raise
        finally:
            if not slot.done():
                slot.cancel()
                queue.remove(slot)
                if not queue:
                    self.waiting.pop(key, None)
        return not slot.cancelled()

    def _release(self, key: bytes) -> None:
        queue = self.waiting.get(key)
        while queue:
            slot = queue.popleft()
            if not queue:
                self.waiting.pop(key, None)
            if not slot.done():
                slot.set_result(None)  # the slot passes to the first waiter: in_flight is unchanged
                return
        _decrement(self.in_flight, key)

    async def _refuse_held(self, send, hold: tuple[float, bytes]) -> None:
        """The held 429, once the hold ends or the refusal delay passes, whichever is first."""
        await asyncio.sleep(min(self.refusal_delay_s, max(0.0, hold[0] - self.clock())))
        await self._repeat(send, hold)

    async def _buffered(self, scope, receive, send) -> bytes | None:
        """The whole body, read within the deadline and cap; None if answered (or the client left)."""
        declared = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _respond(send, 413, f"request body is {int(declared)} bytes; the limit is "
                                      f"{self.max_body_bytes}", "request_too_large", "invalid_request_error")
            return None
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None  # the client left: nothing to answer
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        await _respond(send, 413, f"request body exceeds the limit of {self.max_body_bytes} "
                                                  "bytes", "request_too_large", "invalid_request_error")
                        return None
                    chunks.append(chunk)
                    if not message.get("more_body"):
                        break
        except TimeoutError:
            await _respond(send, 408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                           "body_timeout", "invalid_request_error")
            return None
        return b"".join(chunks)

    async def _forward(self, scope, receive, send, key: bytes):
        start: dict | None = None
        chunks: list[bytes] = []
        hold_s: float | None = None
        hold_model: str | None = None

        async def guarded_send(message):
            nonlocal start, hold_s, hold_model
            if message["type"] == "http.response.start":
                raw = message.get("headers") or []
                hold = next((v for k, v in raw if k.lower() == HOLD), None)
                if hold is not None:
                    model = next((v for k, v in raw if k.lower() == HOLD_MODEL), None)
                    hold_model = model.decode("utf-8", "replace") if model is not None else None
                    message = {**message, "headers": [(k, v) for k, v in raw if k.lower() not in (HOLD, HOLD_MODEL)]}
                    hold_s = _seconds(hold)
                    if hold_s is not None and message["status"] == 429:
                        chunks.clear()
                        start = message  # hold the body too: it is what this key hears until then
                        return
                headers = dict(message.get("headers") or [])
                ctype = headers.get(b"content-type", b"")
                if message["status"] >= 400 and not ctype.startswith(b"application/json") \
                        and not ctype.startswith(b"text/event-stream"):
                    start = message  # a body of the proxy's own: hold it, rewrite it at the end
                    return
                return await send(message)
            if start is not None and message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                if hold_s is not None:
                    body = b"".join(chunks)
                    self._hold(key, hold_model, hold_s, body)
                    await send(start)
                    return await send({"type": "http.response.body", "body": body})
                body = openai_error_body(start["status"], b"".join(chunks).decode("utf-8", "replace"))
                headers = [(k, v) for k, v in start.get("headers") or []
                           if k.lower() not in (b"content-type", b"content-length")]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({**start, "headers": headers})
                return await send({"type": "http.response.body", "body": body})
            return await send(message)

        await self.app(scope, receive, guarded_send)


def _decrement(counts: dict[bytes, int], key: bytes) -> None:
    left = counts.get(key, 1) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def _replay(body: bytes, receive):
    """A ``receive`` that gives the whole body once, then passes on to the client's (so the app
    still hears a disconnect)."""
    whole: dict | None = {"type": "http.request", "body": body, "more_body": False}

    async def replay():
        nonlocal whole
        if whole is not None:
            message, whole = whole, None
            return message
        return await receive()

    return replay


def _seconds(raw: bytes) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if 0 < value < 3600 else None


def _multipart(scope) -> bool:
    return any(k.lower() == b"content-type" and v.lower().startswith(b"multipart/") for k, v in scope["headers"])

"""An ASGI middleware for Serve's HTTP proxy: client control headers out, OpenAI-shaped errors in.

Serve's proxy acts on two headers a client may send before Ember sees the request:
``x-request-timeout-seconds`` (``0`` turns the proxy timeout off) and
``x-request-disconnect-disabled`` (keeps a request running after its client left). They are the
operator's knobs, not the caller's, so this middleware removes them. The proxy also answers some
requests itself (a proxy timeout 408, backpressure or an unavailable deployment 503, an unknown
route 404, an internal error 500) with a plain-text body; this middleware rewrites those bodies
into the OpenAI error shape, keeping the status and headers (``Retry-After``, ``x-request-id``).
Ember's own responses are JSON already and pass untouched.

Serve loads it in the proxy process when ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` is
``deployments.proxy_guard:middlewares`` in the environment of the Ray nodes (``make run`` and the
test suite set it).
"""

from __future__ import annotations

import json

from starlette.middleware import Middleware

CALLBACK = "deployments.proxy_guard:middlewares"
STRIPPED = (b"x-request-timeout-seconds", b"x-request-disconnect-disabled")
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


class ProxyGuard:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() not in STRIPPED]
        start: dict | None = None
        chunks: list[bytes] = []

        async def guarded_send(message):
            nonlocal start
            if message["type"] == "http.response.start":
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
                body = openai_error_body(start["status"], b"".join(chunks).decode("utf-8", "replace"))
                headers = [(k, v) for k, v in start.get("headers") or []
                           if k.lower() not in (b"content-type", b"content-length")]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({**start, "headers": headers})
                return await send({"type": "http.response.body", "body": body})
            return await send(message)

        await self.app(scope, receive, guarded_send)

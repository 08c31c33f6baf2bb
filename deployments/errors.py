"""The one place where exceptions become OpenAI-shaped errors, with its twin for streams.

Every error body is ``{"error": {"message", "type", "param", "code"}}``. Handlers raise
``ApiError`` (or let library exceptions escape); ``to_error`` decides the status, and
``error_response`` / ``error_sse_event`` render it for plain and streaming responses. The errors
the platform itself raises (overload, timeouts, lost replicas) are built by the catalogue below,
so each is spelled once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re

from pydantic import ValidationError
from starlette.responses import JSONResponse

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, TaskCancelledError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)

from cluster.stores import StoreUnavailable
from deployments.engines.protocol import EngineDeadError, EngineRequestError
from deployments.wire import hold_headers

log = logging.getLogger("ember.errors")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, type="authentication_error", code="invalid_api_key")


def not_found(message: str, param: str | None = None, code: str = "not_found") -> ApiError:
    return ApiError(404, message, param=param, code=code)


# -- the catalogue of platform errors -----------------------------------------------------------

RETRY_SOON = {"Retry-After": "1"}


def overloaded(model_id: str, expected_wait_s: float | None = None) -> ApiError:
    wait = f" (expected queue wait {expected_wait_s:.2f} s)" if expected_wait_s is not None else ""
    return ApiError(503, f"{model_id} is overloaded{wait}; retry shortly", type="service_unavailable",
                    code="overloaded", headers=RETRY_SOON)


def replica_unavailable() -> ApiError:
    return ApiError(503, "the model replica serving this request failed or is restarting; retry shortly",
                    type="service_unavailable", code="replica_unavailable", headers=RETRY_SOON)


def stream_interrupted() -> ApiError:
    return ApiError(503, "the model stream ended early; the tokens sent so far are billed; retry the request",
                    type="service_unavailable", code="stream_interrupted", headers=RETRY_SOON)


def request_timeout() -> ApiError:
    return ApiError(504, "the model did not answer in time", type="timeout_error", code="timeout")


def stream_stalled(idle_s: float) -> ApiError:
    return ApiError(504, f"the model sent nothing for {idle_s:g} s; the stream was ended",
                    type="timeout_error", code="stream_timeout")


def too_many_failed_large(retry_after_s: float, window_s: float) -> ApiError:
    wait = max(1, math.ceil(retry_after_s))
    return ApiError(429, f"too many large request bodies from this account failed validation in the last "
                         f"{window_s:g} s; fix the requests and retry in {wait} s",
                    type="rate_limit_error", code="too_many_failed_requests",
                    headers={"Retry-After": str(wait), **hold_headers(retry_after_s)})


def store_unavailable(what: str) -> ApiError:
    return ApiError(503, f"{what} is unavailable; retry shortly", type="service_unavailable",
                    code="store_unavailable", headers=RETRY_SOON)


def batch_conflict(batch_id: str, status: str, action: str) -> ApiError:
    return ApiError(409, f"cannot {action} batch {batch_id}: its status is {status}", code="batch_conflict")


# A replica that is gone, stopping or refusing: the platform's fault, never the caller's.
REPLICA_LOST = (ActorDiedError, ActorUnavailableError, RayActorError, ReplicaUnavailableError,
                DeploymentUnavailableError, EngineDeadError)


def is_replica_loss(exc: BaseException) -> bool:
    return isinstance(_unwrap(exc), REPLICA_LOST)


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    err = exc.errors(include_url=False)[0]
    # Drop pydantic's union-member tags ("str", "list[int]", "function-after[...]"): callers
    # name fields, not the types a union tried.
    loc = [str(p) for p in err.get("loc", ()) if not _is_union_tag(p)]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    if err.get("type") == "extra_forbidden":
        # OpenAI's own answer to an argument it does not know; Ember also gives it for fields it
        # knows but cannot honour, rather than answer as if they were not there.
        msg = "unrecognized or unsupported request argument (README: Request fields)"
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more > 0 else ""
    return (f"{param}: {msg}{suffix}" if param else f"{msg}{suffix}"), param


_TYPE_TAG = re.compile(r"^(str|int|float|bool|bytes|none|list|dict|tuple|set)(\[.*\])?$|^function-|^tagged-union|^[A-Z]\w*$")


def _is_union_tag(part) -> bool:
    return isinstance(part, str) and bool(_TYPE_TAG.match(part))


def _unwrap(exc: BaseException) -> BaseException:
    # Ray wraps a replica's exception in RayTaskError; the original sits in `.cause`.
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def to_error(exc: BaseException) -> ApiError:
    """Map any exception to the ApiError the caller should see."""
    if isinstance(exc, ApiError):
        return exc
    exc = _unwrap(exc)
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ValidationError):
        msg, param = _validation_message(exc)
        return bad_request(msg, param=param, code="invalid_parameter")
    if isinstance(exc, EngineRequestError):
        return bad_request(str(exc), param=exc.param, code="invalid_prompt")
    if isinstance(exc, json.JSONDecodeError):
        return bad_request(f"request body is not valid JSON: {exc.msg} at position {exc.pos}",
                           code="invalid_json")
    if isinstance(exc, StoreUnavailable):
        return store_unavailable("the account and usage store")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return request_timeout()
    if isinstance(exc, BackPressureError):
        return overloaded("the model")
    if isinstance(exc, REPLICA_LOST + (RequestCancelledError, TaskCancelledError)):
        return replica_unavailable()
    log.exception("unhandled error", exc_info=exc)
    return ApiError(500, "internal error", type="server_error", code="internal_error")


def error_response(exc: BaseException, headers: dict[str, str] | None = None) -> JSONResponse:
    err = to_error(exc)
    return JSONResponse(err.body(), status_code=err.status, headers={**err.headers, **(headers or {})})


def error_sse_event(exc: BaseException) -> bytes:
    """The stream twin: once a stream has started, an error is sent as an SSE event."""
    err = to_error(exc)
    return b"data: " + json.dumps(err.body()).encode() + b"\n\n"

"""The OpenAPI document Ember serves at ``/openapi.json``, generated from its request models.

Request bodies are the pydantic models' own JSON Schemas (``deployments.openai_api``), so the
document cannot drift from what the ingress validates. Response shapes are hand-written and kept
loose (extra properties allowed) except the error body, which is exact: every error Ember sends is
``{"error": {"message", "type", "param", "code"}}`` and nothing else. The configured served model
ids are listed as ``examples`` of ``model``; any other id is still valid input and gets a 404.
"""

from __future__ import annotations

import copy
from functools import lru_cache

from cluster.config import EmberConfig
from deployments.embeddings import EmbeddingRequest
from deployments.openai_api import ChatCompletionRequest, CompletionRequest
from deployments.responses import ResponsesRequest

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"

# Which error statuses each kind of operation can answer with (README, "Errors").
_AUTH_ERRORS = ("401",)
_GENERATION_ERRORS = ("400", "401", "402", "404", "405", "413", "429", "503", "504")
_READ_ERRORS = ("401", "404", "405", "429", "503")

_ERROR_DESCRIPTIONS = {
    "400": "Invalid parameters, malformed JSON, a prompt longer than the context or max_tokens too large.",
    "401": "Missing or unknown API key.",
    "402": "The account's monthly spend limit is reached.",
    "404": "Unknown or removed model (the message names the replacement), or unknown resource.",
    "405": "Wrong method on a known route.",
    "413": "Request body over the configured limit.",
    "429": ("The caller's own rate limit, or too many invalid API keys from one address; "
            "Retry-After says when to retry."),
    "503": "The platform shed load, a replica is restarting, or the store is unavailable.",
    "504": "The model did not answer in time.",
}

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                "schema": {"type": "string"}}}

_RATE_LIMIT_HEADERS = {
    f"X-Ratelimit-{kind}-Tokens-{budget}": {
        "description": f"{kind} of the per-minute {budget.lower().replace('-', ' ')} token budget.",
        "schema": {"type": "string"},
    }
    for kind in ("Limit", "Remaining")
    for budget in ("Prompt", "Cache-Adjusted-Prompt", "Generated")
}

_GENERATION_HEADERS = {
    "x-request-id": {"description": "The request's id (the caller's own, if it sent one).",
                     "schema": {"type": "string"}},
    **{f"fireworks-{name}": {"description": f"{name} (non-streamed responses; durations in seconds).",
                             "schema": {"type": "string"}}
       for name in ("prompt-tokens", "cached-prompt-tokens", "server-time-to-first-token",
                    "server-processing-time")},
    **_RATE_LIMIT_HEADERS,
    "Deprecation": {"description": "Set when the model is deprecated.", "schema": {"type": "string"}},
    "Sunset": {"description": "The deprecated model's removal date.", "schema": {"type": "string"}},
}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_STR, _INT, _NUM = {"type": "string"}, {"type": "integer"}, {"type": "number"}

# Response shapes: what Ember sends, loosely (callers must ignore fields they do not know).
_RESPONSE_SCHEMAS: dict[str, dict] = {
    "Error": {
        "type": "object",
        "description": "Every error Ember sends, in OpenAI's shape.",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "additionalProperties": False,
                "properties": {
                    "message": _STR,
                    "type": _STR,
                    "param": _nullable(_STR),
                    "code": _nullable(_STR),
                },
            }
        },
    },
    "ServerSentEvent": {
        "type": "object",
        "description": ("One event of a stream (OpenAPI 3.1: the schema of each event). Its `data` is "
                        "a JSON chunk, the final chunk (with usage), an error body if the stream "
                        "failed after it started, or `[DONE]`, which ends every stream that did not fail."),
        "required": ["data"],
        "properties": {
            "event": _STR,
            "data": _STR,
            "id": _STR,
            "retry": {"type": "integer", "minimum": 0},
        },
    },
    "CompletionUsage": {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"],
        "properties": {
            "prompt_tokens": {"type": "integer", "minimum": 0},
            "completion_tokens": {"type": "integer", "minimum": 0},
            "total_tokens": {"type": "integer", "minimum": 0},
            "prompt_tokens_details": {
                "type": "object",
                "required": ["cached_tokens"],
                "properties": {"cached_tokens": {"type": "integer", "minimum": 0}},
            },
        },
    },
    "PerfMetrics": {
        "type": "object",
        "description": "Present when the request set perf_metrics_in_response; durations in seconds.",
        "properties": {
            "prompt-tokens": _INT,
            "cached-prompt-tokens": _INT,
            "server-time-to-first-token": _NUM,
            "server-processing-time": _NUM,
        },
    },
    "ChatCompletion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": _STR,
            "object": {"const": "chat.completion"},
            "created": _INT,
            "model": _STR,
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "message", "finish_reason"],
                    "properties": {
                        "index": _INT,
                        "message": {
                            "type": "object",
                            "required": ["role", "content"],
                            "properties": {"role": {"const": "assistant"}, "content": _nullable(_STR),
                                           "refusal": _nullable(_STR)},
                        },
                        "logprobs": _nullable({"type": "object"}),
                        "finish_reason": _STR,
                    },
                },
            },
            "usage": {"$ref": REF.format(model="CompletionUsage")},
            "service_tier": _STR,
            "perf_metrics": {"$ref": REF.format(model="PerfMetrics")},
        },
    },
    "Completion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": _STR,
            "object": {"const": "text_completion"},
            "created": _INT,
            "model": _STR,
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "text", "finish_reason"],
                    "properties": {
                        "index": _INT,
                        "text": _STR,
                        "logprobs": _nullable({"type": "object"}),
                        "finish_reason": _STR,
                    },
                },
            },
            "usage": {"$ref": REF.format(model="CompletionUsage")},
            "perf_metrics": {"$ref": REF.format(model="PerfMetrics")},
        },
    },
    "EmbeddingList": {
        "type": "object",
        "required": ["object", "data", "model", "usage"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {
                "type": "object",
                "required": ["object", "index", "embedding"],
                "properties": {
                    "object": {"const": "embedding"},
                    "index": _INT,
                    "embedding": {"anyOf": [{"type": "array", "items": _NUM},
                                            {"type": "string", "description": "base64 of little-endian float32"}]},
                },
            }},
            "model": _STR,
            "usage": {"type": "object", "required": ["prompt_tokens", "total_tokens"],
                      "properties": {"prompt_tokens": _INT, "total_tokens": _INT}},
        },
    },
    "Response": {
        "type": "object",
        "description": "A response of the Responses API (OpenAI's shape; see its reference).",
        "required": ["id", "object", "created_at", "status", "model", "output", "usage"],
        "properties": {
            "id": _STR,
            "object": {"const": "response"},
            "created_at": _INT,
            "status": {"enum": ["completed", "incomplete", "in_progress"]},
            "model": _STR,
            "output": {"type": "array", "items": {"type": "object"}},
            "previous_response_id": _nullable(_STR),
            "usage": _nullable({"type": "object"}),
        },
    },
    "ResponseDeleted": {
        "type": "object",
        "required": ["id", "object", "deleted"],
        "properties": {"id": _STR, "object": {"const": "response"}, "deleted": {"const": True}},
    },
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": _STR,
            "object": {"const": "model"},
            "created": _INT,
            "owned_by": _STR,
            "context_length": _INT,
            "kind": {"enum": ["base", "fast"]},
            "status": {"enum": ["active", "deprecated", "removed"]},
            "deprecation_date": _nullable(_STR),
            "shutdown_date": _nullable(_STR),
            "replacement": _nullable(_STR),
            "service_tiers": {"type": "array", "items": _STR},
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"$ref": REF.format(model="Model")}},
        },
    },
    "UsageReport": {
        "type": "object",
        "description": "The caller's own usage and cost, by model and day.",
        "required": ["object", "account", "data"],
        "properties": {
            "object": {"const": "usage"},
            "account": _STR,
            "spend_tier": {"anyOf": [_INT, _STR]},
            "total_cost_usd": _NUM,
            "month_cost_usd": _NUM,
            "monthly_spend_limit_usd": _nullable(_NUM),
            "data": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Account": {
        "type": "object",
        "required": ["object", "id"],
        "properties": {
            "object": {"const": "account"},
            "id": _STR,
            "spend_tier": {"anyOf": [_INT, _STR]},
            "monthly_spend_limit_usd": _nullable(_NUM),
            "month_cost_usd": _NUM,
        },
    },
}


@lru_cache(maxsize=1)
def _request_schemas() -> dict[str, dict]:
    """The request models' JSON Schemas, their nested models hoisted into components."""
    out: dict[str, dict] = {}
    for model in (ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ResponsesRequest):
        schema = model.model_json_schema(ref_template=REF)
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def _json(ref: str) -> dict:
    return {"application/json": {"schema": {"$ref": REF.format(model=ref)}}}


def _errors(statuses: tuple[str, ...]) -> dict:
    return {status: {"$ref": f"#/components/responses/Error{status}"} for status in statuses}


def _generation(summary: str, request: str, response: str, stream_note: str, tag: str) -> dict:
    return {
        "post": {
            "operationId": request[0].lower() + request[1:].replace("Request", ""),
            "summary": summary,
            "tags": [tag],
            "requestBody": {"required": True, "content": _json(request)},
            "responses": {
                "200": {
                    "description": f"The whole response, or (with stream=true) {stream_note}",
                    "headers": _GENERATION_HEADERS,
                    "content": {
                        **_json(response),
                        "text/event-stream": {"schema": {"$ref": REF.format(model="ServerSentEvent")}},
                    },
                },
                **_errors(_GENERATION_ERRORS),
            },
        }
    }


def _read(summary: str, op_id: str, response: str, tag: str, parameters: list | None = None) -> dict:
    op = {
        "operationId": op_id,
        "summary": summary,
        "tags": [tag],
        "responses": {
            "200": {"description": "OK", "headers": {"x-request-id": _GENERATION_HEADERS["x-request-id"]},
                    "content": _json(response)},
            **_errors(_READ_ERRORS),
        },
    }
    if parameters:
        op["parameters"] = parameters
    return {"get": op}


_RESPONSE_ID = {"name": "response_id", "in": "path", "required": True, "schema": _STR}


def openapi_document(config: EmberConfig) -> dict:
    served = [m.id for m in config.models if m.served]
    ingress = config.ingress
    schemas = copy.deepcopy(_request_schemas())
    for name in ("ChatCompletionRequest", "CompletionRequest", "EmbeddingRequest", "ResponsesRequest"):
        model_prop = schemas[name]["properties"]["model"]
        model_prop["examples"] = served
        model_prop["description"] = ("A model id; GET /v1/models lists those this account may call. "
                                     "Unknown or removed ids get 404.")
    schemas.update(copy.deepcopy(_RESPONSE_SCHEMAS))

    responses = {
        f"Error{status}": {
            "description": desc,
            "content": _json("Error"),
            **({"headers": copy.deepcopy(_RETRY_AFTER)} if status in ("429", "503") else {}),
        }
        for status, desc in _ERROR_DESCRIPTIONS.items()
    }

    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Ember",
            "version": "0.1.0",
            "description": (
                "OpenAI-compatible inference API. Every path under /v1 is also served under "
                "/inference/v1. A request field Ember does not know, or cannot honour on the model, "
                "is a 400 naming it (fields that change nothing, such as metadata, are accepted); "
                f"every field Ember reads is range-checked. This deployment allows at most {ingress.max_completion_tokens} "
                f"completion tokens and {ingress.max_n} choices per request, and bodies of at most "
                f"{ingress.max_body_bytes} bytes. Rate-limit headers are per minute. Every error "
                'body is {"error": {"message", "type", "param", "code"}}.'
            ),
        },
        "security": [{"bearerAuth": []}],
        "tags": [{"name": "inference"}, {"name": "account"}],
        "paths": {
            "/v1/chat/completions": _generation(
                "Create a chat completion", "ChatCompletionRequest", "ChatCompletion",
                "chat.completion.chunk events whose final chunk carries usage", "inference"),
            "/v1/completions": _generation(
                "Create a completion (one prompt per request)", "CompletionRequest", "Completion",
                "text_completion chunks whose final chunk carries usage", "inference"),
            "/v1/embeddings": {"post": {**_generation(
                "Create embeddings (embedding models only)", "EmbeddingRequest", "EmbeddingList", "",
                "inference")["post"], "responses": {
                    "200": {"description": "The vectors, in input order",
                            "headers": _GENERATION_HEADERS, "content": _json("EmbeddingList")},
                    **_errors(_GENERATION_ERRORS)}}},
            "/v1/responses": _generation(
                "Create a response (the Responses API)", "ResponsesRequest", "Response",
                "response.* events (no [DONE]) ending with response.completed or response.incomplete",
                "inference"),
            "/v1/responses/{response_id}": {
                **_read("A stored response (its owner only; any other account gets 404)", "getResponse",
                        "Response", "inference", parameters=[_RESPONSE_ID]),
                "delete": {**_read("Delete a stored response (its owner only)", "deleteResponse",
                                   "ResponseDeleted", "inference", parameters=[_RESPONSE_ID])["get"]},
            },
            "/v1/models": _read("List the models this account may call", "listModels", "ModelList",
                                "inference"),
            "/v1/models/{model}": _read(
                "One model this account may call (ids hold slashes; any other id is 404)", "retrieveModel",
                "Model", "inference",
                parameters=[{"name": "model", "in": "path", "required": True, "schema": _STR}]),
            "/v1/usage": _read("The caller's own usage and cost", "getUsage", "UsageReport", "account"),
            "/v1/accounts/{account_id}": _read(
                "The caller's own account (any other id is 404)", "getAccount", "Account", "account",
                parameters=[{"name": "account_id", "in": "path", "required": True, "schema": _STR}]),
            "/openapi.json": {
                "get": {
                    "operationId": "getOpenApiDocument",
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": {"description": "The OpenAPI document",
                                          "content": {"application/json": {"schema": {"type": "object"}}}}},
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer",
                               "description": "Authorization: Bearer <API key>"},
            },
            "schemas": schemas,
            "responses": responses,
        },
    }

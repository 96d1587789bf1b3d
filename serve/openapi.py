"""The OpenAPI 3.1 description of the server, generated from the pydantic models.

Request bodies come from `serve/schemas.py` (what the server validates), response bodies from
`serve/responses.py`; nothing here is written by hand but the list of routes. The description
is built per request from the models as they are, so a new request field appears without an
edit here. One adjustment makes it say what the server does: every optional request field
also accepts an explicit `null` (meaning "the default"; `schemas._Body` drops such nulls).
"""

from __future__ import annotations

import copy
import functools
import inspect
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from llama_jax import __version__
from serve import responses, schemas
from serve.settings import Settings

REF = "#/components/schemas/{model}"
JSON = "application/json"


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel] | dict, description: str = "OK") -> dict:
    schema = _ref(model) if isinstance(model, type) else model
    return {"description": description, "content": {JSON: {"schema": schema}}}


_ERRORS = {
    "4XX": _json(
        responses.ErrorResponse,
        "A bad request (400), unknown model or route (404), body too large "
        "(413) or rate limit (429, with `Retry-After`).",
    ),
    "5XX": _json(
        responses.ErrorResponse,
        "Model loading or queue full (503, with `Retry-After`), or a server fault (500).",
    ),
}


# One server-sent event as a reader parses it: its `data` is the JSON of `x-event-schema` (or
# `[DONE]`, or an error object), `event` its type where the stream names one.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
}


def _stream(chunk: type[BaseModel], example: str) -> dict:
    return {"schema": SSE_EVENT, "x-event-schema": _ref(chunk), "example": example}


_DATA_EXAMPLE = 'data: {"id": "...", "choices": [...]}\n\ndata: [DONE]\n\n'


def _operation(summary: str, tag: str, ok: dict, body: type[BaseModel] | None = None, **extra: Any) -> dict:
    op: dict[str, Any] = {
        "summary": summary,
        "operationId": extra.pop("operation_id"),
        "tags": [tag],
        "responses": {"200": ok, **_ERRORS},
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {JSON: {"schema": _ref(body)}}}
    op.update(extra)
    return op


def _paths(settings: Settings) -> dict:
    model_param = {
        "name": "model",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "A served model's name (default: the first).",
    }
    chat_ok = _json(responses.ChatCompletion, "The completion, or with `stream: true` server-sent events.")
    chat_ok["content"]["text/event-stream"] = _stream(responses.ChatCompletionChunk, _DATA_EXAMPLE)
    completion_ok = _json(responses.Completion, "The completion, or with `stream: true` server-sent events.")
    completion_ok["content"]["text/event-stream"] = _stream(responses.Completion, _DATA_EXAMPLE)
    responses_ok = _json(responses.ResponseObject, "The response, or with `stream: true` server-sent events.")
    responses_ok["content"]["text/event-stream"] = _stream(
        responses.ResponseStreamEvent, 'event: response.created\ndata: {"type": "response.created", ...}\n\n'
    )
    health = _json(responses.Health, "Ready")
    paths: dict[str, dict] = {
        "/v1/chat/completions": {
            "post": _operation(
                "Chat completion",
                "OpenAI",
                chat_ok,
                schemas.ChatCompletionRequest,
                operation_id="createChatCompletion",
            )
        },
        "/v1/completions": {
            "post": _operation(
                "Text completion (legacy)",
                "OpenAI",
                completion_ok,
                schemas.CompletionRequest,
                operation_id="createCompletion",
            )
        },
        "/v1/responses": {
            "post": _operation(
                "Responses API (stateless: no previous_response_id, nothing stored)",
                "OpenAI",
                responses_ok,
                schemas.ResponsesRequest,
                operation_id="createResponse",
            )
        },
        "/v1/embeddings": {
            "post": _operation(
                "Embeddings (mean-pooled, L2-normalized)",
                "OpenAI",
                _json(responses.EmbeddingList),
                schemas.EmbeddingRequest,
                operation_id="createEmbedding",
            )
        },
        "/v1/models": {
            "get": _operation("List models", "OpenAI", _json(responses.ModelList), operation_id="listModels")
        },
        "/v1/models/{model}": {
            "get": _operation(
                "Retrieve a model",
                "OpenAI",
                _json(responses.ModelCard),
                operation_id="retrieveModel",
                parameters=[{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            )
        },
        "/tokenize": {
            "post": _operation(
                "Text to token ids (llama.cpp's `content`, or vLLM's `prompt` or `messages`)",
                "Extensions",
                _json(responses.TokenizeResponse),
                schemas.TokenizeRequest,
                operation_id="tokenize",
            )
        },
        "/detokenize": {
            "post": _operation(
                "Token ids to text (llama.cpp)",
                "Extensions",
                _json(responses.DetokenizeResponse),
                schemas.DetokenizeRequest,
                operation_id="detokenize",
            )
        },
        "/apply-template": {
            "post": _operation(
                "Render the chat template only (llama.cpp)",
                "Extensions",
                _json(responses.ApplyTemplateResponse),
                schemas.ApplyTemplateRequest,
                operation_id="applyTemplate",
            )
        },
        "/slots": {
            "get": _operation(
                "What each slot is doing (llama.cpp)",
                "Extensions",
                _json({"type": "array", "items": _ref(responses.Slot)}),
                operation_id="slots",
                parameters=[model_param],
            )
        },
        "/props": {
            "get": _operation(
                "The model's defaults and facts (llama.cpp)",
                "Extensions",
                _json(responses.Props),
                operation_id="props",
                parameters=[model_param],
            )
        },
        "/version": {
            "get": {
                "summary": "The server's version (vLLM)",
                "operationId": "version",
                "tags": ["Operations"],
                "security": [],
                "responses": {"200": _json(responses.Version)},
            }
        },
        "/health": {
            "get": {
                "summary": "Readiness: 200 when every model can serve",
                "operationId": "health",
                "tags": ["Operations"],
                "security": [],
                "responses": {
                    "200": health,
                    "503": _json(responses.Health, "Loading, failed or shutting down"),
                },
            }
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics",
                "Operations",
                {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}},
                operation_id="metrics",
            )
        },
        "/openapi.json": {
            "get": _operation(
                "This description", "Operations", _json({"type": "object"}), operation_id="openapi"
            )
        },
        "/docs": {
            "get": _operation(
                "This description as a page",
                "Operations",
                {"description": "OK", "content": {"text/html": {"schema": {"type": "string"}}}},
                operation_id="docs",
            )
        },
    }
    if settings.webui:
        html = {"description": "OK", "content": {"text/html": {"schema": {"type": "string"}}}}
        paths["/"] = {"get": _operation("The chat page", "Web UI", html, operation_id="webui", security=[])}
        paths["/static/webui/{filename}"] = {
            "get": _operation(
                "The chat page's files",
                "Web UI",
                {"description": "OK", "content": {"*/*": {}}},
                operation_id="webuiFile",
                security=[],
                parameters=[
                    {"name": "filename", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
            )
        }
    return paths


def _request_models() -> list[type[BaseModel]]:
    found = [
        m
        for m in vars(schemas).values()
        if inspect.isclass(m) and issubclass(m, schemas._Body) and m.__module__ == schemas.__name__
    ]
    return [m for m in found if not any(o is not m and issubclass(o, m) for o in found)]  # no bases


def _response_models() -> list[type[BaseModel]]:
    return [
        m
        for m in vars(responses).values()
        if inspect.isclass(m) and issubclass(m, BaseModel) and m.__module__ == responses.__name__
    ]


def _allow_null(schema: dict) -> dict:
    if schema.get("type") == "null" or any(s.get("type") == "null" for s in schema.get("anyOf", ())):
        return schema
    if "anyOf" in schema:
        return {**schema, "anyOf": [*schema["anyOf"], {"type": "null"}]}
    keep = {k: schema[k] for k in ("title", "description", "default") if k in schema}
    inner = {k: v for k, v in schema.items() if k not in keep}
    return {"anyOf": [inner, {"type": "null"}], **keep}


@functools.lru_cache(maxsize=1)
def _components() -> dict:
    requests, outs = _request_models(), _response_models()
    _, top = models_json_schema(
        [(m, "validation") for m in requests] + [(m, "serialization") for m in outs], ref_template=REF
    )
    defs = top["$defs"]
    for m in requests:  # `_Body` reads an explicit null as "not given"
        d = defs.get(m.__name__)
        if d is None:
            continue
        required = set(d.get("required", ()))
        d["properties"] = {
            k: v if k in required else _allow_null(v) for k, v in d.get("properties", {}).items()
        }
    return defs


def build(settings: Settings) -> dict:
    """The OpenAPI 3.1 document for a server with `settings`."""
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "llama-jax",
            "version": __version__,
            "description": "OpenAI-compatible API (chat, completions, embeddings, models) and "
            "llama.cpp-style extensions, served by llama-jax. Errors are always "
            '`{"error": {"message", "type", "param", "code"}}`.',
        },
        "paths": _paths(settings),
        "components": {"schemas": copy.deepcopy(_components())},
    }
    if settings.api_keys:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        spec["security"] = [{"bearer": []}]
    return spec

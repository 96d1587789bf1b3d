"""Errors as the OpenAI API returns them: one exception type, one JSON shape, one mapping.

Every failure leaves the server as `{"error": {"message", "type", "param", "code"}}` with a
string or null `code` (what OpenAI's clients parse). Library exceptions (`LlamaJaxError`
and its subclasses) are mapped here, and only here, to an HTTP status: handlers let them
rise, and the app's error handler (or, mid-stream, `serve/sse.py`) calls `from_library`.
"""

from __future__ import annotations

import logging

from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from llama_jax import (
    ContextLengthError,
    EngineDeadError,
    InvalidRequestError,
    OverloadedError,
    TemplateError,
)

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    """An HTTP error with an OpenAI error object; raise it anywhere in a handler."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
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

    def response(self) -> tuple[dict, int, dict[str, str]]:
        """A Quart response: the error object, the status and the headers."""
        return self.body(), self.status, self.headers


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")


def unavailable(message: str, code: str = "model_loading") -> APIError:
    return APIError(
        503,
        message,
        type="service_unavailable_error",
        code=code,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def from_library(e: Exception) -> APIError:
    """The API error for an exception raised by `llama_jax` (an `APIError` passes through)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), param=e.param or "messages", code="context_length_exceeded")
    if isinstance(e, InvalidRequestError):
        return APIError(400, str(e), param=e.param)
    if isinstance(e, TemplateError):
        return APIError(400, str(e), param="messages", code="invalid_template")
    if isinstance(e, OverloadedError):
        return unavailable(f"The server is overloaded: {e}. Retry later.", code="server_is_overloaded")
    if isinstance(e, EngineDeadError):
        return APIError(500, "The inference engine stopped; the server must be restarted.", "server_error")
    log.error("unexpected error", exc_info=e)
    return APIError(500, "The server had an error while processing your request.", "server_error")


def from_http(e: HTTPException) -> APIError:
    """Routing and protocol errors (404, 405, 413, ...) as OpenAI error objects."""
    status = e.code or 500
    if status == 404:
        return APIError(
            404,
            "Unknown route: see /v1/models, /v1/chat/completions, /v1/completions, /v1/responses, "
            "/v1/embeddings, /tokenize, /detokenize, /apply-template, /health",
            code="not_found",
        )
    if status == 405:
        return APIError(405, f"Method not allowed: {e.description}", code="method_not_allowed")
    if status == 413:
        return APIError(413, "The request body is too large", code="request_too_large")
    kind = "invalid_request_error" if status < 500 else "server_error"
    return APIError(status, e.description or e.name, kind)


_UNION_TAGS = ("str", "int", "float", "bool", "dict", "list", "none")


def from_validation(e: ValidationError) -> APIError:
    """A 400 naming the first offending field (`messages[0].role`), for JSON and schema errors."""
    err = e.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return bad_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
            f"using your HTTP library correctly. The OpenAI API expects a JSON payload.) {err['msg']}"
        )
    param = ""
    for part in err["loc"]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part.split("[")[0] in _UNION_TAGS or part[:1].isupper() or part.startswith("function-"):
            continue  # pydantic's names for union members, not fields
        else:
            param += f".{part}" if param else part
    if err["type"] == "model_type" and not param:
        return bad_request("The request body must be a JSON object")
    param = param or None
    if err["type"] == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param)
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    if param is None:
        return bad_request(f"Invalid request: {err['msg'].removeprefix('Value error, ')}.")
    return bad_request(f"Invalid value for '{param}': {err['msg']} (got {shown[:100]}).", param=param)

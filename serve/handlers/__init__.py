"""Route handlers, one blueprint per resource: thin functions that validate the body, call
the library and shape OpenAI's response."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from quart import current_app, g, request

from serve.errors import from_validation
from serve.state import ServerState

M = TypeVar("M", bound=BaseModel)


def state() -> ServerState:
    return current_app.extensions["llama_jax"]


async def parse_body(model: type[M]) -> M:
    """The request body validated as `model`; any problem is a 400 naming the field."""
    body = await request.get_data()
    try:
        return model.model_validate_json(body or b"")
    except ValidationError as e:
        raise from_validation(e) from None


def note_tokens(prompt: int, completion: int = 0) -> None:
    """Token counts for this request's log line."""
    g.tokens = (prompt, completion)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(16)}"


def now() -> int:
    return int(time.time())


access_log = logging.getLogger("serve.access")


def log_request(
    request_id: str,
    method: str,
    path: str,
    status: int,
    tokens: tuple[int, int] | None,
    seconds: float,
    outcome: str = "",
) -> None:
    """One line per request: id, route, status, prompt/completion tokens, time."""
    toks = f" tokens={tokens[0]}+{tokens[1]}" if tokens else ""
    extra = f" {outcome}" if outcome and outcome != "ok" else ""
    access_log.info("%s %s %s %d%s %.3fs%s", request_id, method, path, status, toks, seconds, extra)


def stream_logger(tokens: Callable[[], tuple[int, int]]) -> Callable[[str, float], None]:
    """The log callback of a streamed response (its line is written when the stream ends)."""
    g.streaming = True
    rid, method, path, t0 = g.request_id, request.method, request.path, g.started

    def on_end(outcome: str, seconds: float) -> None:
        log_request(rid, method, path, 200, tokens(), time.monotonic() - t0, outcome)

    return on_end


def usage(prompt: int, completion: int, cached: int | None = None) -> dict:
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out

"""Server-sent events as OpenAI streams them: `data: {json}\\n\\n` ... `data: [DONE]\\n\\n`.

A stream that fails midway ends with `data: {"error": {...}}` (the official client raises it;
a library error mapped as the app's error handler maps it) and no `[DONE]`. The response has no server-side timeout: a long generation is never cut.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from quart import Response

from llama_jax import LlamaJaxError
from serve.errors import APIError, from_library

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def event(obj: object) -> bytes:
    return b"data: " + dumps(obj).encode() + b"\n\n"


def sse_response(
    events: AsyncIterator[bytes], request_id: str, on_end: Callable[[str, float], None]
) -> Response:
    """A streaming response for `events`; `on_end(outcome, seconds)` runs once when it ends
    (`ok`, `error` or `disconnected`), for the request log."""
    t0 = time.monotonic()

    async def body() -> AsyncIterator[bytes]:
        outcome = "disconnected"
        try:
            async for chunk in events:
                yield chunk
            outcome = "ok"
        except (APIError, LlamaJaxError) as e:
            outcome = "error"
            yield event(from_library(e).body())
        except Exception as e:  # noqa: BLE001 - a fault mid-stream still reaches the client as an error
            log.exception("stream %s failed", request_id)
            outcome = "error"
            yield event(APIError(500, f"The server had an error: {type(e).__name__}", "server_error").body())
        finally:
            on_end(outcome, time.monotonic() - t0)

    response = Response(body(), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.timeout = None  # never cut a long stream
    return response

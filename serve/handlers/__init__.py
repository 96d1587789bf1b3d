"""Route handlers, one blueprint per resource: thin functions that validate the body, call
the library and shape OpenAI's response. Shared here: body parsing, the per-request record
(log line, metrics, rate-limit settlement) and small response helpers."""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel, ValidationError
from quart import current_app, g, request

from serve.errors import from_validation
from serve.state import ModelEntry, ServerState

if TYPE_CHECKING:
    from llama_jax import Generator
    from serve.limits import RateLimiter
    from serve.metrics import ServerMetrics

M = TypeVar("M", bound=BaseModel)
access_log = logging.getLogger("serve.access")


def state() -> ServerState:
    return current_app.extensions["llama_jax"]


async def parse_body(model: type[M]) -> M:
    """The request body validated as `model`; any problem is a 400 naming the field."""
    body = await request.get_data()
    try:
        return model.model_validate_json(body or b"")
    except ValidationError as e:
        raise from_validation(e) from None


@dataclasses.dataclass
class RequestRecord:
    """One request's bookkeeping, finished exactly once: when the response is returned, or
    for a stream when its last event is sent (or the client goes away)."""

    id: str
    method: str
    path: str
    route: str
    client: str
    key: str | None
    limiter: RateLimiter
    metrics: ServerMetrics
    started: float = dataclasses.field(default_factory=time.monotonic)
    model: str = ""
    tokens: tuple[int, int] | None = None
    count: Callable[[], tuple[int, int]] | None = None  # live (prompt, generated) of a generation
    reserved: int = 0
    done: bool = False

    def reserve(self, n: int) -> None:
        """Reserve `n` tokens of the client's per-minute budget (429 when it lacks them)."""
        self.reserved = self.limiter.reserve_tokens(self.client, self.key, n)

    def finish(self, status: int, outcome: str = "") -> None:
        if self.done:
            return
        self.done = True
        seconds = time.monotonic() - self.started
        if self.count is not None and (self.tokens is None or outcome):
            self.tokens = self.count()  # what was really generated, also when the client left
        used = sum(self.tokens) if self.tokens else 0
        self.limiter.settle(self.client, self.key, self.reserved, used)
        self.metrics.observe(self.route, status, self.model or "-", seconds)
        toks = f" tokens={self.tokens[0]}+{self.tokens[1]}" if self.tokens else ""
        extra = f" {outcome}" if outcome and outcome != "ok" else ""
        access_log.info(
            "%s %s %s %d%s %.3fs%s", self.id, self.method, self.path, status, toks, seconds, extra
        )


def record() -> RequestRecord:
    return g.record


def note_tokens(prompt: int, completion: int = 0) -> None:
    """Token counts for this request's log line, metrics and rate-limit settlement."""
    g.record.tokens = (prompt, completion)


STREAM_STATUS = {"ok": 200, "disconnected": 499, "error": 500}  # for metrics: the HTTP status was 200


def stream_finisher(tokens: Callable[[], tuple[int, int]]) -> Callable[[str, float], None]:
    """The end callback of a streamed response: its record finishes when the stream does."""
    g.streaming = True
    rec = g.record
    rec.count = tokens

    def on_end(outcome: str, _seconds: float) -> None:
        rec.finish(STREAM_STATUS.get(outcome, 200), outcome)

    return on_end


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(16)}"


def now() -> int:
    return int(time.time())


async def serving(name: str | None) -> tuple[ModelEntry, Generator]:
    """The model called `name` and its ready generator (404, 503 otherwise; a lazy model is
    loaded first); noted for metrics."""
    st = state()
    entry = st.get(name)
    g.record.model = entry.id
    return entry, await st.generator(name)

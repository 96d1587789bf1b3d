"""The shape chat completions and text completions share: one response's id, creation time,
model name and fingerprint on its body and on every chunk; its choices; its usage (completion
tokens of every sample, cached prompt tokens once per prompt); the finish chunk of each
choice; and the end of a stream (the usage chunk when `stream_options.include_usage` asks
for it, then `[DONE]`). What goes inside a choice (a message, a delta, a text) is each
route's own."""

from __future__ import annotations

from collections.abc import Iterator

from llama_jax import Delta
from serve.handlers import new_id, note_tokens, now
from serve.schemas import StreamOptions
from serve.sse import DONE, event
from serve.state import ModelEntry

# kind -> (id prefix, object of a body, object of a chunk, a choice's empty payload)
KINDS = {
    "chat": ("chatcmpl", "chat.completion", "chat.completion.chunk", {"delta": {}}),
    "text": ("cmpl", "text_completion", "text_completion", {"text": ""}),
}


def usage(prompt: int, completion: int, cached: int | None = None) -> dict:
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def choice(index: int, payload: dict, logprobs: dict | None = None, finish_reason: str | None = None) -> dict:
    """One choice (or a chunk's choice): `payload` is its message, delta or text."""
    return {"index": index, **payload, "logprobs": logprobs, "finish_reason": finish_reason}


class Reply:
    """One response of `kind` ("chat" or "text") to `n` samples of each prompt (choice index
    `prompt * n + sample`), answering as `model` for `entry`."""

    def __init__(
        self,
        kind: str,
        entry: ModelEntry,
        model: str | None,
        prompt_tokens: int,
        n: int,
        stream_options: StreamOptions | None = None,
    ):
        prefix, self._object, self._chunk_object, self._empty = KINDS[kind]
        self.base = {
            "id": new_id(prefix),
            "created": now(),
            "model": entry.answer_name(model),
            "system_fingerprint": entry.fingerprint,
        }
        self.prompt_tokens = prompt_tokens
        self.n = n
        # OpenAI sends `usage` (null but on the last chunk) only when it was asked for.
        self.include_usage = bool(stream_options and stream_options.include_usage)
        self.completion_tokens = 0
        self.cached_tokens = 0

    def finished(self, index: int, delta: Delta) -> None:
        """Count the usage of a sample whose last delta this is."""
        self.completion_tokens += delta.usage.completion_tokens
        if index % self.n == 0:  # the samples of a prompt share its cached prefix
            self.cached_tokens += delta.usage.cached_tokens

    def usage(self) -> dict:
        return usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)

    def body(self, choices: list[dict]) -> dict:
        """The whole response, once every sample has finished (its tokens noted for the log)."""
        note_tokens(self.prompt_tokens, self.completion_tokens)
        return {**self.base, "object": self._object, "choices": choices, "usage": self.usage()}

    def chunk(self, choices: list[dict], use: dict | None = None) -> bytes:
        extra = {"usage": use} if self.include_usage else {}
        return event({**self.base, "object": self._chunk_object, "choices": choices, **extra})

    def finish_chunk(self, index: int, reason: str | None) -> bytes:
        """The last chunk of a choice: nothing new but its finish reason."""
        return self.chunk([choice(index, self._empty, finish_reason=reason)])

    def end(self) -> Iterator[bytes]:
        """What closes the stream once every choice has finished."""
        if self.include_usage:
            yield self.chunk([], self.usage())
        yield DONE

"""From a validated request to scheduler requests and back: sampling values and stop rules,
`n` samples of several prompts merged into one asyncio stream, and logprobs in OpenAI's shapes."""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import AsyncIterator, Sequence

from llama_jax import (
    DEFAULT_MAX_TOKENS,
    SAMPLING_FIELDS,
    Delta,
    Generator,
    Grammar,
    SamplingParams,
    StopRules,
)
from serve.errors import APIError, bad_request
from serve.schemas import SamplingFields

LOGPROB_FLOOR = -9999.0  # OpenAI's value for "not finite"


def request_params(
    req: SamplingFields,
    gen: Generator,
    prompt_len: int,
    max_tokens: int | None,
    top_logprobs: int = 0,
) -> tuple[SamplingParams, StopRules]:
    """The library's sampling values and stop rules for a request; library validation errors
    become 400s. Every sampling field (`llama_jax.sampling.FIELDS`) the body has and sets is
    passed on; the ones it leaves out keep the library's defaults.

    Without an explicit `max_tokens` the completion may use the default or what is left of
    the context, whichever is smaller; an explicit value beyond the context is an error."""
    if max_tokens is None:
        max_tokens = max(1, min(DEFAULT_MAX_TOKENS, gen.max_seq_len - prompt_len))
    elif prompt_len + max_tokens > gen.max_seq_len:  # before any token budget is reserved
        raise APIError(
            400,
            f"This model's maximum context length is {gen.max_seq_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
            "completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        if not key.isascii() or not key.isdigit():  # int() would also take "+5", " 7 ", "1_000", "٣"
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
        tok = int(key)
        if not 0 <= tok < gen.config.vocab_size:
            raise bad_request(f"logit_bias token id {tok} is outside the vocabulary", "logit_bias")
        bias[tok] = value
    given = {name: getattr(req, name, None) for name in SAMPLING_FIELDS}
    given.update(logit_bias=bias, top_logprobs=top_logprobs)
    return (
        SamplingParams(**{k: v for k, v in given.items() if v is not None}),
        StopRules(max_tokens=max_tokens, stop=tuple(req.stop_list()), ignore_eos=req.ignore_eos),
    )


class Samples:
    """`n` samples of each prompt, run concurrently, read as one stream of `(index, delta)`.

    Choice `index` is `prompt * n + sample`. Submitting raises the library's errors at once
    (queue full, context too long), before any response is sent; one that ends a sample later
    is raised by the iteration. Leaving the iteration early (a client that went away) cancels
    every request still running. `client` (a key, an address) is held to its share of the
    queue: more requests than the share are a 400, more than is left of it a 503."""

    def __init__(
        self,
        gen: Generator,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        rules: StopRules,
        n: int,
        grammar: Grammar | None = None,
        client: str | None = None,
    ):
        self._gen = gen
        self._queue: asyncio.Queue = asyncio.Queue()
        self.requests: list = []  # the generator's requests (`Generator.submit_group`)
        most = gen.client_queue
        if len(prompts) * n > most:
            raise bad_request(
                f"{len(prompts)} prompts x n={n} is more than this server queues for one client ({most})",
                "prompt" if len(prompts) > 1 else "n",
            )
        aloop = asyncio.get_running_loop()
        # A response whose body never starts (the client left while its headers were being
        # sent) drops this object unread: its requests are cancelled then, not left running.
        weakref.finalize(self, _cancel_all, gen, self.requests)
        try:
            for p, ids in enumerate(prompts):
                sinks = [_sink(aloop, self._queue, p * n + j) for j in range(n)]
                self.requests += gen.submit_group(ids, params, rules, sinks, grammar=grammar, client=client)
        except BaseException:
            self.cancel()
            raise

    @property
    def generated(self) -> int:
        return sum(len(r.output_ids) for r in self.requests)

    def cancel(self) -> None:
        _cancel_all(self._gen, self.requests)

    async def __aiter__(self) -> AsyncIterator[tuple[int, Delta]]:
        left = len(self.requests)
        try:
            while left:
                index, item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    left -= 1
                yield index, item
        finally:
            self.cancel()


def _sink(aloop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
    def put(item: Delta | BaseException) -> None:
        if not aloop.is_closed():
            aloop.call_soon_threadsafe(queue.put_nowait, (index, item))

    return put


def _cancel_all(gen: Generator, requests: list) -> None:
    for r in requests:
        gen.cancel(r)


def finite(x: float) -> float:
    return x if math.isfinite(x) else LOGPROB_FLOOR


def chat_logprobs(gen: Generator, delta: Delta, skip: frozenset[int]) -> list[dict]:
    """`logprobs.content` entries for the tokens of one delta (end-of-turn tokens left out)."""
    tok = gen.tokenizer
    out = []
    for i, (t, lp) in enumerate(zip(delta.token_ids, delta.logprobs, strict=True)):
        if t in skip:
            continue
        tops = delta.top_logprobs[i] if i < len(delta.top_logprobs) else ()
        out.append(
            {
                "token": tok.token_to_piece(t),
                "logprob": finite(lp),
                "bytes": list(tok.token_bytes(t)),
                "top_logprobs": [
                    {
                        "token": tok.token_to_piece(a),
                        "logprob": finite(alp),
                        "bytes": list(tok.token_bytes(a)),
                    }
                    for a, alp in tops
                ],
            }
        )
    return out


class CompletionLogprobs:
    """Legacy completions' `logprobs` ({tokens, token_logprobs, top_logprobs, text_offset})."""

    def __init__(self, offset: int = 0):
        self.offset = offset
        self.data: dict[str, list] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }

    def add(self, gen: Generator, delta: Delta, skip: frozenset[int]) -> dict:
        """Append one delta's tokens; returns the part for this delta (for streaming)."""
        part: dict[str, list] = {k: [] for k in self.data}
        tok = gen.tokenizer
        for i, (t, lp) in enumerate(zip(delta.token_ids, delta.logprobs, strict=True)):
            if t in skip:
                continue
            piece = tok.token_to_piece(t)
            tops = delta.top_logprobs[i] if i < len(delta.top_logprobs) else ()
            part["tokens"].append(piece)
            part["token_logprobs"].append(finite(lp))
            part["top_logprobs"].append({tok.token_to_piece(a): finite(alp) for a, alp in tops})
            part["text_offset"].append(self.offset)
            self.offset += len(piece)
        for k, v in part.items():
            self.data[k] += v
        return part

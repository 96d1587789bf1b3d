"""`POST /v1/completions`: legacy text completions (prompt as text, texts or token ids; `echo`;
structured output through the fields of `serve/structured.py`)."""

from __future__ import annotations

import asyncio

from quart import Blueprint, g

from serve.errors import APIError, bad_request, from_library
from serve.generation import CompletionLogprobs, Samples, request_params
from serve.handlers import (
    new_id,
    note_tokens,
    now,
    parse_body,
    record,
    serving,
    stream_finisher,
    usage,
)
from serve.schemas import CompletionRequest
from serve.sse import DONE, event, sse_response
from serve.structured import requested_grammar

bp = Blueprint("completions", __name__)


@bp.post("/v1/completions")
async def completions():
    body = await parse_body(CompletionRequest)
    entry, gen = await serving(body.model)
    if body.suffix:
        raise bad_request("suffix (insertion) is not supported by this server", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of is not supported; use n", "best_of")
    if body.echo and body.logprobs is not None:
        raise bad_request("echo together with logprobs is not supported (no prompt logprobs)", "echo")
    prompts = _prompts(body.prompt)
    grammar = requested_grammar(body)
    if grammar is not None:
        try:  # compiling a grammar must not stall the event loop
            await asyncio.to_thread(gen.check_grammar, grammar)
        except Exception as e:
            raise from_library(e) from e
    # Tokenized on a worker thread: a long prompt must not stall every other request.
    ids = await asyncio.to_thread(
        lambda: [gen.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    )
    if any(not p for p in ids):
        raise bad_request("prompt must not be empty", "prompt")
    top = body.logprobs or 0
    params, rules = request_params(body, gen, max(map(len, ids)), body.max_tokens, top_logprobs=top)
    record().reserve(sum(map(len, ids)) + len(ids) * body.n * rules.max_tokens)
    try:
        samples = Samples(gen, ids, params, rules, body.n, grammar, client=record().client)
    except APIError as e:
        if e.code == "context_length_exceeded":
            e.param = "prompt"
        raise
    record().count = lambda: (sum(map(len, ids)), samples.generated)
    n_choices = len(ids) * body.n
    echoes = [(p if isinstance(p, str) else gen.tokenizer.decode(p)) if body.echo else "" for p in prompts]
    skip = gen.scheduler.eos_ids | frozenset(rules.stop_token_ids)
    logprobs = [CompletionLogprobs(len(echoes[i // body.n])) for i in range(n_choices)]
    prompt_tokens = sum(map(len, ids))
    base = {
        "id": new_id("cmpl"),
        "created": now(),
        "model": entry.answer_name(body.model),
        "system_fingerprint": entry.fingerprint,
    }

    if not body.stream:
        texts = [echoes[i // body.n] for i in range(n_choices)]
        reasons: list[str | None] = [None] * n_choices
        completion = cached = 0
        async for i, d in samples:
            texts[i] += d.text
            if body.logprobs is not None:
                logprobs[i].add(gen, d, skip)
            if d.finish_reason is not None:
                reasons[i] = d.finish_reason
                completion += d.usage.completion_tokens
                if i % body.n == 0:
                    cached += d.usage.cached_tokens
        note_tokens(prompt_tokens, completion)
        return {
            **base,
            "object": "text_completion",
            "choices": [
                {
                    "index": i,
                    "text": texts[i],
                    "logprobs": logprobs[i].data if body.logprobs is not None else None,
                    "finish_reason": reasons[i],
                }
                for i in range(n_choices)
            ],
            "usage": usage(prompt_tokens, completion, cached),
        }

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    counts = {"completion": 0, "cached": 0}

    def chunk(choices: list[dict], use: dict | None = None) -> bytes:
        # OpenAI sends `usage` (null but on the last chunk) only when it was asked for.
        extra = {"usage": use} if include_usage else {}
        return event({**base, "object": "text_completion", "choices": choices, **extra})

    async def events():
        for i in range(n_choices):
            if echoes[i // body.n]:
                yield chunk(
                    [{"index": i, "text": echoes[i // body.n], "logprobs": None, "finish_reason": None}]
                )
        async for i, d in samples:
            lp = logprobs[i].add(gen, d, skip) if body.logprobs is not None else None
            if d.text or (lp and lp["tokens"]):
                yield chunk([{"index": i, "text": d.text, "logprobs": lp, "finish_reason": None}])
            if d.finish_reason is not None:
                counts["completion"] += d.usage.completion_tokens
                if i % body.n == 0:
                    counts["cached"] += d.usage.cached_tokens
                yield chunk([{"index": i, "text": "", "logprobs": None, "finish_reason": d.finish_reason}])
        if include_usage:
            yield chunk([], usage(prompt_tokens, counts["completion"], counts["cached"]))
        yield DONE

    return sse_response(events(), g.request_id, stream_finisher(lambda: (prompt_tokens, samples.generated)))


def _prompts(prompt: str | list) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)

"""`POST /v1/completions`: legacy text completions (prompt as text, texts or token ids; `echo`;
structured output through the fields of `serve/structured.py`)."""

from __future__ import annotations

import asyncio

from quart import Blueprint, g

from llama_jax import ContextLengthError
from serve.errors import bad_request
from serve.generation import CompletionLogprobs, Samples, request_params
from serve.handlers import parse_body, record, serving, stream_finisher
from serve.reply import Reply, choice
from serve.schemas import CompletionRequest
from serve.sse import sse_response
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
    if grammar is not None:  # compiled on a thread: it must not stall the event loop
        await asyncio.to_thread(gen.check_grammar, grammar)
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
    except ContextLengthError as e:
        e.param = "prompt"
        raise
    record().count = lambda: (sum(map(len, ids)), samples.generated)
    n_choices = len(ids) * body.n
    echoes = [(p if isinstance(p, str) else gen.tokenizer.decode(p)) if body.echo else "" for p in prompts]
    skip = gen.eos_ids | frozenset(rules.stop_token_ids)
    logprobs = [CompletionLogprobs(len(echoes[i // body.n])) for i in range(n_choices)]
    reply = Reply("text", entry, body.model, sum(map(len, ids)), body.n, body.stream_options)

    if not body.stream:
        texts = [echoes[i // body.n] for i in range(n_choices)]
        reasons: list[str | None] = [None] * n_choices
        async for i, d in samples:
            texts[i] += d.text
            if body.logprobs is not None:
                logprobs[i].add(gen, d, skip)
            if d.finish_reason is not None:
                reasons[i] = d.finish_reason
                reply.finished(i, d)
        lps = [lp.data if body.logprobs is not None else None for lp in logprobs]
        return reply.body([choice(i, {"text": texts[i]}, lps[i], reasons[i]) for i in range(n_choices)])

    async def events():
        for i in range(n_choices):
            if echoes[i // body.n]:
                yield reply.chunk([choice(i, {"text": echoes[i // body.n]})])
        async for i, d in samples:
            lp = logprobs[i].add(gen, d, skip) if body.logprobs is not None else None
            if d.text or (lp and lp["tokens"]):
                yield reply.chunk([choice(i, {"text": d.text}, lp)])
            if d.finish_reason is not None:
                reply.finished(i, d)
                yield reply.finish_chunk(i, d.finish_reason)
        for e in reply.end():
            yield e

    return sse_response(
        events(), g.request_id, stream_finisher(lambda: (reply.prompt_tokens, samples.generated))
    )


def _prompts(prompt: str | list) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)

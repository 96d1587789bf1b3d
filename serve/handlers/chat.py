"""`POST /v1/chat/completions`: chat through the model's template, streamed or not, with
tools (calls parsed from the output, or forced by a grammar), `response_format` and the other
structured-output fields (`serve/structured.py`), `chat_template_kwargs`, and a reasoning
block returned as `reasoning_content`."""

from __future__ import annotations

import asyncio
import functools

from quart import Blueprint, g

from serve.generation import Samples, chat_logprobs, request_params
from serve.handlers import parse_body, record, serving, state, stream_finisher
from serve.output import OutputReader, splits_reasoning
from serve.reply import Reply, choice
from serve.schemas import ChatCompletionRequest
from serve.sse import sse_response
from serve.structured import requested_grammar

bp = Blueprint("chat", __name__)


@bp.post("/v1/chat/completions")
async def chat_completions():
    body = await parse_body(ChatCompletionRequest)
    entry, gen = await serving(body.model)
    messages = [m.for_template() for m in body.messages]
    grammar = requested_grammar(body)
    # Rendering, tokenizing and compiling a grammar must not stall the event loop.
    prep = await asyncio.to_thread(
        functools.partial(
            gen.prepare_chat,
            messages,
            tools=body.tools,
            tool_choice=body.tool_choice,
            response_format=body.response_format,
            parallel_tool_calls=body.parallel_tool_calls,
            grammar=grammar,
            template_kwargs=body.chat_template_kwargs,
        )
    )
    ids = prep.prompt_ids
    max_tokens = body.max_completion_tokens or body.max_tokens
    top = (body.top_logprobs or 0) if body.logprobs else 0
    params, rules = request_params(body, gen, len(ids), max_tokens, top_logprobs=top)
    record().reserve(len(ids) + body.n * rules.max_tokens)
    samples = Samples(gen, [ids], params, rules, body.n, prep.grammar, client=record().client)
    record().count = lambda: (len(ids), samples.generated)
    skip = gen.eos_ids | frozenset(rules.stop_token_ids)
    reply = Reply("chat", entry, body.model, len(ids), body.n, body.stream_options)
    split = splits_reasoning(body.reasoning_format, state().settings.reasoning_format)
    readers = [OutputReader(prep, split) for _ in range(body.n)]

    def logprobs(entries: list[dict]) -> dict:
        return {"content": entries, "refusal": None}

    if not body.stream:
        texts = [""] * body.n
        reasons: list[str | None] = [None] * body.n
        lps: list[list[dict]] = [[] for _ in range(body.n)]
        async for i, d in samples:
            texts[i] += d.text
            if body.logprobs:
                lps[i] += chat_logprobs(gen, d, skip)
            if d.finish_reason is not None:
                reasons[i] = d.finish_reason
                reply.finished(i, d)
        choices = []
        for i, reader in enumerate(readers):
            message, reason = _message(texts[i], reasons[i], reader)
            choices.append(
                choice(i, {"message": message}, logprobs(lps[i]) if body.logprobs else None, reason)
            )
        return reply.body(choices)

    def pieces(i: int, text: str, entries: list, finish: bool = False) -> list[dict]:
        """Choice deltas for new text: reasoning, content, or tool-call deltas for calls."""
        out = []
        for piece in readers[i].feed(text, finish):
            if piece[0] == "call":
                delta = {"tool_calls": [{"index": piece[1], **piece[2]}]}
            else:
                delta = {"reasoning_content" if piece[0] == "reasoning" else "content": piece[1]}
            out.append(choice(i, {"delta": delta}))
        if out and body.logprobs:
            out[0]["logprobs"] = logprobs(entries)
        elif entries:  # logprobs of tokens whose text is held back (a possible call) still go out
            out.append(choice(i, {"delta": {}}, logprobs(entries)))
        return out

    async def events():
        for i in range(body.n):
            yield reply.chunk([choice(i, {"delta": {"role": "assistant", "content": ""}})])
        async for i, d in samples:
            entries = chat_logprobs(gen, d, skip) if body.logprobs else []
            for c in pieces(i, d.text, entries, finish=d.finish_reason is not None):
                yield reply.chunk([c])
            if d.finish_reason is not None:
                reply.finished(i, d)
                yield reply.finish_chunk(i, _reason(d.finish_reason, readers[i]))
        for e in reply.end():
            yield e

    return sse_response(events(), g.request_id, stream_finisher(lambda: (len(ids), samples.generated)))


def _reason(reason: str | None, reader: OutputReader) -> str | None:
    """OpenAI says "tool_calls" when a turn that ended normally made calls."""
    return "tool_calls" if reason == "stop" and reader.calls else reason


def _message(text: str, reason: str | None, reader: OutputReader) -> tuple[dict, str | None]:
    """A choice's message and finish reason: the reasoning block as `reasoning_content`, calls
    found in the text as `tool_calls`."""
    reader.feed(text, finish=True)
    message: dict = {"role": "assistant", "content": reader.content, "refusal": None}
    if reader.reasoning is not None:
        message["reasoning_content"] = reader.reasoning
    if reader.calls:
        message["content"] = reader.content or None
        message["tool_calls"] = [c.to_openai() for c in reader.calls]
    return message, _reason(reason, reader)

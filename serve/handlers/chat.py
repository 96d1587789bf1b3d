"""`POST /v1/chat/completions`: chat through the model's template, streamed or not, with
tools (calls parsed from the output, or forced by a grammar) and `response_format`."""

from __future__ import annotations

import asyncio
import functools

from quart import Blueprint, g

from llama_jax.tools import ToolCallStream
from serve.errors import from_library
from serve.generation import Samples, chat_logprobs, sampling_params
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
from serve.schemas import ChatCompletionRequest
from serve.sse import DONE, event, sse_response

bp = Blueprint("chat", __name__)


@bp.post("/v1/chat/completions")
async def chat_completions():
    body = await parse_body(ChatCompletionRequest)
    entry, gen = await serving(body.model)
    messages = [m.for_template() for m in body.messages]
    try:  # rendering, tokenizing and compiling a grammar must not stall the event loop
        prep = await asyncio.to_thread(
            functools.partial(
                gen.prepare_chat,
                messages,
                tools=body.tools,
                tool_choice=body.tool_choice,
                response_format=body.response_format,
                parallel_tool_calls=body.parallel_tool_calls,
            )
        )
    except Exception as e:
        raise from_library(e) from e
    ids = prep.prompt_ids
    max_tokens = body.max_completion_tokens or body.max_tokens
    top = (body.top_logprobs or 0) if body.logprobs else 0
    params = prep.sampling(sampling_params(body, gen, len(ids), max_tokens, top_logprobs=top))
    record().reserve(len(ids) + body.n * params.max_tokens)
    samples = Samples(gen, [ids], params, body.n, client=record().client)
    record().count = lambda: (len(ids), samples.generated)
    skip = gen.engine.eos_ids | frozenset(params.stop_token_ids)
    cid, created = new_id("chatcmpl"), now()
    base = {
        "id": cid,
        "created": created,
        "model": entry.answer_name(body.model),
        "system_fingerprint": entry.fingerprint,
    }

    if not body.stream:
        parsers = [prep.tool_stream() for _ in range(body.n)]
        texts = [""] * body.n
        reasons: list[str | None] = [None] * body.n
        lps: list[list[dict]] = [[] for _ in range(body.n)]
        lead = None
        completion = 0
        async for i, d in samples:
            texts[i] += d.text
            if body.logprobs:
                lps[i] += chat_logprobs(gen, d, skip)
            if d.finish_reason is not None:
                reasons[i] = d.finish_reason
                completion += d.usage.completion_tokens
                if i == 0:
                    lead = d.usage
        note_tokens(len(ids), completion)
        return {
            **base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": i,
                    **_message(texts[i], reasons[i], parsers[i]),
                    "logprobs": {"content": lps[i], "refusal": None} if body.logprobs else None,
                }
                for i in range(body.n)
            ],
            "usage": usage(len(ids), completion, lead.cached_tokens if lead else 0),
        }

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    counts = {"completion": 0, "cached": 0}

    def chunk(choices: list[dict], use: dict | None = None) -> bytes:
        # OpenAI sends `usage` (null but on the last chunk) only when it was asked for.
        extra = {"usage": use} if include_usage else {}
        return event({**base, "object": "chat.completion.chunk", "choices": choices, **extra})

    parsers = [prep.tool_stream() for _ in range(body.n)]

    def pieces(i: int, text: str, entries: list, finish: bool = False) -> list[dict]:
        """Choice deltas for new text: content, or tool-call deltas when the text holds calls."""
        parser = parsers[i]
        if parser is None:
            found = [("content", text)] if text or entries else []
        else:
            found = parser.feed(text) + (parser.finish() if finish else [])
        out = []
        for piece in found:
            delta = (
                {"content": piece[1]}
                if piece[0] == "content"
                else {"tool_calls": [{"index": piece[1], **piece[2]}]}
            )
            out.append({"index": i, "delta": delta, "logprobs": None, "finish_reason": None})
        if out and body.logprobs:
            out[0]["logprobs"] = {"content": entries, "refusal": None}
        elif entries:  # logprobs of tokens whose text is held back (a possible call) still go out
            out.append(
                {
                    "index": i,
                    "delta": {},
                    "logprobs": {"content": entries, "refusal": None},
                    "finish_reason": None,
                }
            )
        return out

    async def events():
        for i in range(body.n):
            yield chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
        async for i, d in samples:
            entries = chat_logprobs(gen, d, skip) if body.logprobs else []
            for choice in pieces(i, d.text, entries, finish=d.finish_reason is not None):
                yield chunk([choice])
            if d.finish_reason is not None:
                counts["completion"] += d.usage.completion_tokens
                if i == 0:
                    counts["cached"] = d.usage.cached_tokens
                reason = _reason(d.finish_reason, parsers[i])
                yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}])
        if include_usage:
            yield chunk([], usage(len(ids), counts["completion"], counts["cached"]))
        yield DONE

    return sse_response(events(), g.request_id, stream_finisher(lambda: (len(ids), samples.generated)))


def _reason(reason: str | None, parser: ToolCallStream | None) -> str | None:
    """OpenAI says "tool_calls" when a turn that ended normally made calls."""
    return "tool_calls" if reason == "stop" and parser is not None and parser.calls else reason


def _message(text: str, reason: str | None, parser: ToolCallStream | None) -> dict:
    """A choice's message and finish reason; calls found in the text become `tool_calls`."""
    message: dict = {"role": "assistant", "content": text, "refusal": None}
    if parser is not None:
        parser.feed(text)
        parser.finish()
        if parser.calls:
            message["content"] = parser.content or None
            message["tool_calls"] = [c.to_openai() for c in parser.calls]
    return {"message": message, "finish_reason": _reason(reason, parser)}

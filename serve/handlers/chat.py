"""`POST /v1/chat/completions`: chat through the model's template, streamed or not."""

from __future__ import annotations

import asyncio

from quart import Blueprint, g

from serve.errors import bad_request, from_library
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
    if body.tools and body.tool_choice not in (None, "none"):
        raise bad_request("tool calling is not supported yet; send tool_choice 'none'", "tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise bad_request("only response_format type 'text' is supported yet", "response_format")
    messages = [m.for_template() for m in body.messages]
    try:
        ids = await asyncio.to_thread(gen.encode_chat, messages)  # a long prompt must not stall the loop
    except Exception as e:
        raise from_library(e) from e
    max_tokens = body.max_completion_tokens or body.max_tokens
    top = (body.top_logprobs or 0) if body.logprobs else 0
    params = sampling_params(body, gen, len(ids), max_tokens, top_logprobs=top)
    record().reserve(len(ids) + body.n * params.max_tokens)
    samples = Samples(gen, [ids], params, body.n)
    record().count = lambda: (len(ids), samples.generated)
    skip = gen.engine.eos_ids | frozenset(params.stop_token_ids)
    cid, created = new_id("chatcmpl"), now()
    base = {"id": cid, "created": created, "model": body.model, "system_fingerprint": entry.fingerprint}

    if not body.stream:
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
                    "message": {"role": "assistant", "content": texts[i], "refusal": None},
                    "logprobs": {"content": lps[i], "refusal": None} if body.logprobs else None,
                    "finish_reason": reasons[i],
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
            if d.text or entries:
                yield chunk(
                    [
                        {
                            "index": i,
                            "delta": {"content": d.text},
                            "logprobs": {"content": entries, "refusal": None} if body.logprobs else None,
                            "finish_reason": None,
                        }
                    ]
                )
            if d.finish_reason is not None:
                counts["completion"] += d.usage.completion_tokens
                if i == 0:
                    counts["cached"] = d.usage.cached_tokens
                yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": d.finish_reason}])
        if include_usage:
            yield chunk([], usage(len(ids), counts["completion"], counts["cached"]))
        yield DONE

    return sse_response(events(), g.request_id, stream_finisher(lambda: (len(ids), samples.generated)))

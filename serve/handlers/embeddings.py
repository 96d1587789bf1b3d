"""`POST /v1/embeddings`: mean-pooled, L2-normalized hidden states, as floats or base64
(little-endian float32, what the official client asks for by default).

A request holds at most `MAX_EMBEDDING_TOKENS` tokens. The engine embeds it a chunk per step
between decode steps, and a client that goes away stops it after the current chunk."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
from quart import Blueprint

from serve.errors import bad_request
from serve.handlers import note_tokens, parse_body, record, serving
from serve.schemas import MAX_EMBEDDING_INPUTS, EmbeddingRequest

bp = Blueprint("embeddings", __name__)

MAX_EMBEDDING_TOKENS = 131_072  # per request, all inputs together (OpenAI's is 300,000)


@bp.post("/v1/embeddings")
async def embeddings():
    body = await parse_body(EmbeddingRequest)
    entry, gen = await serving(body.model)
    inputs = body.input
    if isinstance(inputs, list) and len(inputs) > MAX_EMBEDDING_INPUTS and not isinstance(inputs[0], int):
        raise bad_request(f"at most {MAX_EMBEDDING_INPUTS} inputs per request", "input")
    if body.dimensions is not None and body.dimensions != gen.config.dim:
        raise bad_request(
            f"this model's embeddings have {gen.config.dim} dimensions; dimensions cannot change it",
            "dimensions",
        )
    rows = await asyncio.to_thread(gen.embedding_rows, inputs)
    tokens = sum(map(len, rows))
    if tokens > MAX_EMBEDDING_TOKENS:
        raise bad_request(
            f"the inputs hold {tokens} tokens; at most {MAX_EMBEDDING_TOKENS} per request", "input"
        )
    record().reserve(tokens)
    vectors = await gen.aembed(rows)  # a client that leaves cancels this task, and the rest of the work
    note_tokens(tokens)
    vectors = np.asarray(vectors, dtype="<f4")
    if body.encoding_format == "base64":
        data = [base64.b64encode(v.tobytes()).decode("ascii") for v in vectors]
    else:
        data = [v.tolist() for v in vectors]
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
        "model": entry.answer_name(body.model),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }

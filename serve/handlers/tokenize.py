"""llama.cpp's `POST /tokenize`, `POST /detokenize` and `POST /apply-template`; `/tokenize`
also takes vLLM's body (`prompt` or `messages`) and then answers `tokens`, `count` and
`max_model_len` as vLLM does.

A body may be as large as the server accepts (8 MiB by default): each is validated and
worked on a thread, not on the event loop, so that streams and `/health` go on meanwhile.
These routes count against the request rate limit like `/v1/*` (`serve/app.py`).
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from quart import Blueprint, Response, current_app, request

from serve.errors import bad_request, from_validation
from serve.handlers import serving
from serve.schemas import ApplyTemplateRequest, DetokenizeRequest, TokenizeRequest

bp = Blueprint("tokenize", __name__)

M = TypeVar("M", bound=BaseModel)


async def _off_loop(work) -> Response:
    """`work()`'s result as a JSON response, computed and serialized on a thread (a million
    token ids take a while to write as JSON too)."""
    dumps = current_app.json.dumps
    text = await asyncio.to_thread(lambda: dumps(work()))
    return Response(text, content_type="application/json")


async def _body(model: type[M]) -> M:
    data = await request.get_data()

    def validate() -> M:
        try:
            return model.model_validate_json(data or b"")
        except ValidationError as e:
            raise from_validation(e) from None

    return await asyncio.to_thread(validate)


@bp.post("/tokenize")
async def tokenize():
    body = await _body(TokenizeRequest)
    _, gen = await serving(body.model)
    tok = gen.tokenizer

    def work() -> dict:
        if body.content is not None:  # llama.cpp's shape
            ids = tok.encode(body.content, add_bos=body.add_special, parse_special=body.parse_special)
            if body.with_pieces:
                return {"tokens": [{"id": t, "piece": tok.token_to_piece(t)} for t in ids]}
            return {"tokens": ids}
        if body.prompt is not None:  # vLLM's shapes
            bos = True if body.add_special_tokens is None else body.add_special_tokens
            ids = tok.encode(body.prompt, add_bos=bos, parse_special=body.parse_special)
        else:
            messages = [m.for_template() for m in body.messages or ()]
            text = gen.render_chat(messages, body.add_generation_prompt)  # BOS where the model wants one
            ids = tok.encode(text, add_bos=bool(body.add_special_tokens))
        return {"tokens": ids, "count": len(ids), "max_model_len": gen.max_seq_len}

    return await _off_loop(work)


@bp.post("/detokenize")
async def detokenize():
    body = await _body(DetokenizeRequest)
    _, gen = await serving(body.model)

    def work() -> dict:
        vocab = gen.config.vocab_size
        if any(t >= vocab for t in body.tokens):
            raise bad_request(f"token ids must be in [0, {vocab})", "tokens")
        return {"content": gen.tokenizer.decode(body.tokens, skip_special=False)}

    return await _off_loop(work)


@bp.post("/apply-template")
async def apply_template():
    body = await _body(ApplyTemplateRequest)
    _, gen = await serving(body.model)

    def work() -> dict:
        return {
            "prompt": gen.render_chat([m.for_template() for m in body.messages], body.add_generation_prompt)
        }

    return await _off_loop(work)

"""llama.cpp's `POST /tokenize`, `POST /detokenize` and `POST /apply-template`."""

from __future__ import annotations

from quart import Blueprint

from serve.errors import bad_request, from_library
from serve.handlers import parse_body, serving
from serve.schemas import ApplyTemplateRequest, DetokenizeRequest, TokenizeRequest

bp = Blueprint("tokenize", __name__)


@bp.post("/tokenize")
async def tokenize():
    body = await parse_body(TokenizeRequest)
    tok = (await serving(body.model))[1].tokenizer
    ids = tok.encode(body.content, add_bos=body.add_special, parse_special=body.parse_special)
    if body.with_pieces:
        return {"tokens": [{"id": t, "piece": tok.token_to_piece(t)} for t in ids]}
    return {"tokens": ids}


@bp.post("/detokenize")
async def detokenize():
    body = await parse_body(DetokenizeRequest)
    _, gen = await serving(body.model)
    vocab = gen.config.vocab_size
    if any(t >= vocab for t in body.tokens):
        raise bad_request(f"token ids must be in [0, {vocab})", "tokens")
    return {"content": gen.tokenizer.decode(body.tokens, skip_special=False)}


@bp.post("/apply-template")
async def apply_template():
    body = await parse_body(ApplyTemplateRequest)
    _, gen = await serving(body.model)
    try:
        prompt = gen.render_chat([m.for_template() for m in body.messages], body.add_generation_prompt)
    except Exception as e:
        raise from_library(e) from e
    return {"prompt": prompt}

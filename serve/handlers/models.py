"""`GET /v1/models` and `GET /v1/models/{id}`: every served model under each of its names."""

from __future__ import annotations

from quart import Blueprint

from serve.handlers import state
from serve.state import ModelEntry

bp = Blueprint("models", __name__)


def _card(name: str, entry: ModelEntry) -> dict:
    card = {
        "id": name,
        "object": "model",
        "created": state().created,
        "owned_by": "llama-jax",
        "root": entry.id,
    }
    gen = entry.generator
    meta = {"status": entry.status, "dtype": entry.spec.dtype, "quantize": entry.spec.quantize}
    if gen is not None:
        meta |= {
            "n_ctx_train": gen.config.context_length,
            "n_ctx": gen.max_seq_len,
            "n_vocab": gen.config.vocab_size,
            "n_embd": gen.config.dim,
            "n_params": gen.config.num_params(),
            "n_slots": gen.max_slots,
        }
    card["meta"] = meta
    return card


@bp.get("/v1/models")
async def list_models():
    return {"object": "list", "data": [_card(n, m) for m in state().models for n in m.names]}


@bp.get("/v1/models/<path:model>")
async def get_model(model: str):
    return _card(model, state().get(model, exact=True))  # a listing: only names that exist

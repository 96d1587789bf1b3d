"""`GET /v1/models` and `GET /v1/models/{id}`: the served model under each of its names."""

from __future__ import annotations

from quart import Blueprint

from serve.handlers import state

bp = Blueprint("models", __name__)


def _card(name: str) -> dict:
    st = state()
    card = {
        "id": name,
        "object": "model",
        "created": st.created,
        "owned_by": "llama-jax",
        "root": st.model_id,
    }
    gen = st.generator
    if gen is not None:
        card["meta"] = {
            "n_ctx_train": gen.config.context_length,
            "n_ctx": gen.max_seq_len,
            "n_vocab": gen.config.vocab_size,
            "n_embd": gen.config.dim,
            "n_params": gen.config.num_params(),
            "dtype": st.settings.dtype,
            "quantize": st.settings.quantize,
        }
    return card


@bp.get("/v1/models")
async def list_models():
    return {"object": "list", "data": [_card(n) for n in state().names]}


@bp.get("/v1/models/<path:model>")
async def get_model(model: str):
    state().check_model(model)
    return _card(model)

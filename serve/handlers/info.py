"""`GET /version` (vLLM's) and `GET /props` (llama.cpp's): what is serving, and with which
defaults. `/props` takes `?model=` (default: the first model) and needs the key, as it names
the model's file; `/version` is open."""

from __future__ import annotations

from quart import Blueprint, request

from llama_jax import __version__
from serve.generation import request_params
from serve.handlers import serving
from serve.schemas import SamplingFields

bp = Blueprint("info", __name__)


@bp.get("/version")
async def version():
    return {"version": __version__}


@bp.get("/props")
async def props():
    entry, gen = await serving(request.args.get("model"))
    # The defaults are what a request that sets nothing gets: derived, not restated.
    d, rules = request_params(SamplingFields(model=entry.id), gen, 0, None)
    return {
        "default_generation_settings": {
            "n_ctx": gen.max_seq_len,
            "params": {
                "temperature": d.temperature,
                "top_p": d.top_p,
                "top_k": d.top_k,
                "min_p": d.min_p,
                "n_predict": rules.max_tokens,
                "presence_penalty": d.presence_penalty,
                "frequency_penalty": d.frequency_penalty,
                "repeat_penalty": d.repetition_penalty,
            },
        },
        "total_slots": gen.max_slots,
        "model_alias": entry.id,
        "model_path": str(gen.loaded.path),
        "chat_template": gen.template.source,
        "bos_token": gen.tokenizer.bos_token,
        "eos_token": gen.tokenizer.eos_token,
        "modalities": {"vision": False, "audio": False},
        "build_info": f"llama-jax {__version__}",
    }

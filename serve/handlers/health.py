"""`GET /health` (200 ok, 503 loading or failed) and `GET /slots` (what each slot is doing)."""

from __future__ import annotations

from quart import Blueprint

from serve.handlers import state

bp = Blueprint("health", __name__)


@bp.get("/health")
async def health():
    st = state()
    if st.healthy:
        return {"status": "ok"}
    if st.status == "loading":
        return {"status": "loading"}, 503, {"Retry-After": "1"}
    error = st.error or "the inference engine stopped"
    return {"status": "error", "error": error}, 503


@bp.get("/slots")
async def slots():
    gen = state().ready()
    engine = gen.engine
    out = []
    for i, req in enumerate(list(engine.slots)):
        out.append(
            {
                "id": i,
                "n_ctx": gen.max_seq_len,
                "is_processing": req is not None,
                "id_task": None if req is None else req.id,
                "n_prompt_tokens": 0 if req is None else len(req.prompt_ids),
                "n_decoded": 0 if req is None else len(req.output_ids),
            }
        )
    return out

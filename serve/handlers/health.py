"""`GET /health` (200 ok; 503 while loading, after a failure, when an engine is stalled or when
shutting down; while step shapes still compile in the background, a `compile` object counts
them) and `GET /slots` (what each slot of a model is doing; `X-Compiled-Shapes` and
`X-Pending-Compiles` headers count the model's step compiles).

`/health` needs no key, so it says what is wrong in general words; the details (a model file's
path, an exception's text) are in the server log."""

from __future__ import annotations

from quart import Blueprint, request

from serve.handlers import state

bp = Blueprint("health", __name__)

LOAD_FAILED = "the model failed to load; the server log says why"
ENGINE_STOPPED = "the inference engine stopped"


@bp.get("/health")
async def health():
    st = state()
    limit = st.settings.stall_timeout_s
    stalled = {m.id: s for m in st.models if (s := m.stalled_for()) > limit > 0}
    per_model = {
        m.id: (
            ("stalled" if m.id in stalled else "ok")
            if m.healthy
            else m.status
            if m.status != "ok"
            else "error"
        )
        for m in st.models
    }
    if st.draining:
        status, code = "shutting_down", 503
    elif any(s == "error" for s in per_model.values()):
        status, code = "error", 503
    elif stalled:
        status, code = "stalled", 503
    elif st.healthy:
        status, code = "ok", 200
    else:
        status, code = "loading", 503
    body: dict = {"status": status}
    if len(st.models) > 1:
        body["models"] = per_model
    errors = {
        m.id: LOAD_FAILED if m.status == "error" else ENGINE_STOPPED
        for m in st.models
        if per_model[m.id] == "error"
    }
    if errors:
        body["errors"] = errors
    if stalled:  # an engine with work that has finished no step for this long
        body["stalled_seconds"] = {k: round(v, 1) for k, v in stalled.items()}
    compiling = compile_counts(st)
    if compiling["pending"]:  # serving, while the step shapes not met yet compile
        body["compile"] = compiling
    return body, code, ({"Retry-After": "1"} if status == "loading" else {})


def compile_counts(st) -> dict:
    """Step shapes compiled and still to compile, over the loaded models, and the ones
    compiling now."""
    counts = [c for m in st.models if (c := m.compile_status()) is not None]
    return {
        "compiled": sum(c["compiled"] for c in counts),
        "pending": sum(c["pending"] for c in counts),
        "compiling": [c["compiling"] for c in counts if c["compiling"]],
    }


@bp.get("/slots")
async def slots():
    """llama.cpp's `/slots`; `?model=` picks a model (default: the first). With API keys, a
    slot's `id_task` is null: the engine does not record which caller a request is for, so
    no caller is shown anyone's request ids (sequential: they tell others' traffic)."""
    st = state()
    gen = await st.generator(request.args.get("model"))
    shared = bool(st.settings.api_keys)
    out = []
    for i, req in enumerate(list(gen.scheduler.slots)):
        out.append(
            {
                "id": i,
                "n_ctx": gen.max_seq_len,
                "is_processing": req is not None,
                "id_task": None if req is None or shared else req.id,
                "n_prompt_tokens": 0 if req is None else len(req.prompt_ids),
                "n_decoded": 0 if req is None else len(req.output_ids),
            }
        )
    counts = gen.compile_status()  # a header: the body is llama.cpp's list of slots
    headers = {"X-Compiled-Shapes": str(counts["compiled"]), "X-Pending-Compiles": str(counts["pending"])}
    return out, 200, headers

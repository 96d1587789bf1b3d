"""Tensor-parallel cases on 8 virtual CPU devices. Not collected by itself (the device count is
fixed when JAX starts): `test_sharding.py` runs this file in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`.

Each mesh (data, model) in (1, 8), (2, 4), (4, 2), (8, 1) must give the one-device greedy tokens
exactly, logits and logprobs within 1e-5 of the logit scale (float32), and every parameter and
the KV cache laid out as the partition rules say. A tiny model (K=4 KV heads: split on 2 and 4
model devices, replicated on 8) and the real default model (3 KV heads: replicated on 2, 4, 8).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from tiny import model_logits, random_tensors, tiny_config

from llama_jax import sharding
from llama_jax.runner import ModelRunner
from llama_jax.sampling import SamplingParams, SlotSampling
from llama_jax.weights import build_model, load_model, pack_tensors
from llama_jax.xla_cache import CompileCounter

if jax.device_count() != 8:
    pytest.fail("run with XLA_FLAGS=--xla_force_host_platform_device_count=8", pytrace=False)

MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]
SLOTS, SEQ = 8, 64
STEPS = 3  # decode steps of the default model (8 virtual devices on 2 cores: ~1 s each)
PROMPT = [1, 9690, 198, 2683, 314, 253, 5356, 11173, 30, 2]  # ids of the default model's vocabulary
TINY_PROMPT = [5, 17, 200, 33, 91, 260, 8, 120, 77, 3]
# K=4 KV heads (split on 2, 4 model devices, replicated on 8), vocab 384 and F=256 (split on all).
TINY = tiny_config(vocab_size=384, n_heads=8, n_kv_heads=4, head_dim=8, ffn_dim=256, tie_embeddings=False)


def close(got: np.ndarray, want: np.ndarray, logits: np.ndarray) -> None:
    """float32 agreement: within 1e-5 of the model's logit scale max|logits| (logprobs too: they
    are logits less a logsumexp). Sharded dots sum in another order, and one float32 ulp at
    |logit| = 35 (the default model's) is already 4e-6, so a bare 1e-5 would test rounding."""
    scale = max(1.0, float(np.abs(logits).max()))
    assert np.abs(got - want).max() <= 1e-5 * scale, (np.abs(got - want).max(), scale)


def expected_specs(cfg, model_axis: int) -> dict[str, P]:
    """The partition table written out for this config (not computed by sharding.py)."""
    heads = "model" if cfg.n_kv_heads % model_axis == 0 else None
    mlp = "model" if cfg.ffn_dim % model_axis == 0 else None
    vocab = "model" if cfg.vocab_size % model_axis == 0 else None
    out = {
        "blocks/wqkv": P(None, None, heads),
        "blocks/wo": P(None, heads),
        "blocks/w_gate_up": P(None, None, None, mlp),
        "blocks/w_down": P(None, mlp),
        "blocks/attn_norm": P(),
        "blocks/mlp_norm": P(),
        "embed": P(vocab),
        "norm": P(),
        "inv_freq": P(),
    }
    if not cfg.tie_embeddings:
        out["lm_head"] = P(vocab)
    return out


def norm(spec) -> tuple:
    spec = list(spec)
    while spec and spec[-1] is None:
        spec.pop()
    return tuple(spec)


def check_layout(model, cfg, mesh) -> None:
    """Every parameter's sharding is the table's, and each device holds only its slice."""
    want = expected_specs(cfg, mesh.shape["model"])
    seen = set()
    for path, x in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]:
        name = "/".join(str(getattr(k, "key", "")) for k in path if hasattr(k, "key"))
        seen.add(name)
        assert x.sharding.mesh.shape == mesh.shape, name
        assert norm(x.sharding.spec) == norm(want[name]), (name, x.sharding.spec, want[name])
        shard = x.addressable_shards[0].data.shape
        for i, axis in enumerate(want[name]):
            assert shard[i] == x.shape[i] // (mesh.shape[axis] if axis else 1), (name, shard)
    assert seen == set(want)


def check_state(state, cfg, mesh) -> None:
    heads = "model" if cfg.n_kv_heads % mesh.shape["model"] == 0 else None
    assert norm(state.k.sharding.spec) == norm(P(None, "data", None, heads)), state.k.sharding.spec
    assert norm(state.lengths.sharding.spec) == ("data",)
    assert norm(state.sampling.key.sharding.spec) == ("data",)
    assert state.k.addressable_shards[0].data.shape[1] == SLOTS // mesh.shape["data"]


def greedy(runner: ModelRunner, prompt: list[int], steps: int, slot: int = 5):
    """Prefill `prompt` into `slot`, then `steps` decode steps: (tokens, logprobs, top-20 logprobs)."""
    from llama_jax.runner import unpack, unpack_top

    state = runner.init_state()
    row = SlotSampling.from_params([SamplingParams(temperature=0.0)], [0])
    state, out = runner.prefill(state, np.asarray(prompt, np.int32), slot, 0, row)
    rows = [np.asarray(out)[0]]
    active = np.zeros(SLOTS, bool)
    active[slot] = True
    for i in range(steps):
        state, out = runner.decode(state, active, len(prompt) + i + 1)
        rows.append(np.asarray(out)[slot])
    packed = np.stack(rows)
    tokens, logprobs = unpack(packed)
    return tokens, logprobs, unpack_top(packed)[1], state


@functools.cache
def tiny_state() -> dict:
    return pack_tensors(TINY, random_tensors(TINY).items(), "tiny")


@functools.cache
def tiny_reference(quantize: str | None = None):
    model = build_model(TINY, tiny_state())
    if quantize:
        from llama_jax.quantize import quantize_model

        quantize_model(model, quantize)
    runner = ModelRunner(model, SLOTS, SEQ)
    return model_logits(model, [TINY_PROMPT]), greedy(runner, TINY_PROMPT, 8)[:3]


@pytest.mark.parametrize("data,model_axis", MESHES)
def test_tiny_mesh_matches_one_device(data, model_axis):
    mesh = sharding.make_mesh(f"data={data},model={model_axis}")
    model = build_model(TINY, tiny_state(), place=sharding.placer(mesh))
    check_layout(model, TINY, mesh)
    logits, (tokens, logprobs, top) = tiny_reference()
    close(model_logits(model, [TINY_PROMPT]), logits, logits)
    runner = ModelRunner(model, SLOTS, SEQ, mesh=mesh)
    got_tokens, got_logprobs, got_top, state = greedy(runner, TINY_PROMPT, 8)
    np.testing.assert_array_equal(got_tokens, tokens)
    close(got_logprobs, logprobs, logits)
    close(got_top, top, logits)
    check_state(state, TINY, mesh)
    # Steady state: another request in another slot reuses every compiled step.
    with CompileCounter() as c:
        greedy(runner, TINY_PROMPT[:7], 3, slot=6)
    assert c.traces == 0


def test_tiny_int8_weights_shard_like_float():
    from llama_jax.quantize import Int8Weight, quantize_model

    mesh = sharding.make_mesh("data=2,model=4")
    model = build_model(TINY, tiny_state(), place=sharding.placer(mesh))
    quantize_model(model, "int8", sharding.placer(mesh))
    w_down = model.blocks.w_down.get_value()  # float [L, F, D]: q is [L, D, F], split on F
    assert isinstance(w_down, Int8Weight)
    assert norm(w_down.q.sharding.spec) == (None, None, "model") and norm(w_down.scale.sharding.spec) == ()
    wqkv = model.blocks.wqkv.get_value()  # [L, D, K, X, H]: q [L, K, X, H, D], scale [L, 1, K, X, H]
    assert norm(wqkv.q.sharding.spec) == (None, "model")
    assert norm(wqkv.scale.sharding.spec) == (None, None, "model")
    embed = model.embed.get_value()  # per-row scales follow the vocabulary split
    assert norm(embed.q.sharding.spec) == ("model",) and norm(embed.scale.sharding.spec) == ("model",)
    assert embed.q.addressable_shards[0].data.shape == (TINY.vocab_size // 4, TINY.dim)
    _, (tokens, logprobs, _) = tiny_reference("int8")
    got_tokens, got_logprobs, _, _ = greedy(ModelRunner(model, SLOTS, SEQ, mesh=mesh), TINY_PROMPT, 8)
    np.testing.assert_array_equal(got_tokens, tokens)
    # int8x2 rounds each activation to int8 steps of max|x|/32258: a 1e-6 difference upstream
    # may move one step, so agreement is to that step, not to float32 rounding.
    np.testing.assert_allclose(got_logprobs, logprobs, atol=1e-3)


def test_the_loader_places_int8_weights_as_quantize_model_does():
    """load_model(quantize="int8") under a mesh splits each Int8Weight's q and scale by the float
    weight's rule (the placer sees the whole weight, not its arrays one by one)."""
    from llama_jax.quantize import Int8Weight

    mesh = sharding.make_mesh("data=2,model=4")
    model = load_model(None, mesh=mesh, quantize="int8").model
    w_down = model.blocks.w_down.get_value()  # float [L, F, D]: q is [L, D, F], split on F
    assert isinstance(w_down, Int8Weight)
    assert norm(w_down.q.sharding.spec) == (None, None, "model") and norm(w_down.scale.sharding.spec) == ()
    embed = model.embed.get_value()
    assert norm(embed.q.sharding.spec) == ("model",) and norm(embed.scale.sharding.spec) == ("model",)


@pytest.fixture(scope="module")
def smollm():
    """The default model's weights (read once) and, on one device, its logits and greedy steps."""
    from llama_jax.gguf import GGUFFile
    from llama_jax.weights import resolve_model_path

    gg = GGUFFile(resolve_model_path(None)[1])
    cfg = gg.config()
    assert cfg.n_kv_heads == 3 and cfg.n_heads == 9
    state = pack_tensors(cfg, gg.tensors(cfg), "smollm")
    model = build_model(cfg, state)  # what load_model(None) builds: one device
    ref = model_logits(model, [PROMPT]), greedy(ModelRunner(model, SLOTS, SEQ), PROMPT, STEPS)[:3]
    return cfg, state, ref


@pytest.mark.parametrize("data,model_axis", MESHES)
def test_default_model_mesh_matches_one_device(smollm, data, model_axis):
    cfg, state, (logits, (tokens, logprobs, top)) = smollm
    mesh = sharding.make_mesh(f"data={data},model={model_axis}")
    if (data, model_axis) == (2, 4):  # the loader's own path once: float tensors placed as they load
        model = load_model(None, mesh=mesh, quantize="none").model
    else:
        model = build_model(cfg, state, place=sharding.placer(mesh))
    check_layout(model, cfg, mesh)
    close(model_logits(model, [PROMPT]), logits, logits)
    got_tokens, got_logprobs, got_top, st = greedy(ModelRunner(model, SLOTS, SEQ, mesh=mesh), PROMPT, STEPS)
    np.testing.assert_array_equal(got_tokens, tokens)
    close(got_logprobs, logprobs, logits)
    close(got_top, top, logits)
    check_state(st, cfg, mesh)

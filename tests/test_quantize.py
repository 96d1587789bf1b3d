"""int8 weight-only quantization: exact int8 algebra, small logit error, the real model still
answers the France question."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import SAMPLE_IDS, random_tensors, tiny_config

from llama_jax import Generator, SamplingParams, quantize
from llama_jax.layout import matmul_names
from llama_jax.quantize import Int8Weight, quantize_array, quantize_model
from llama_jax.weights import build_model, pack_tensors


@nnx.jit
def logits(model, ids):
    h, _, _ = model.hidden(ids, jnp.arange(ids.shape[1])[None])
    return model.logits(h)


def model_logits(model, ids):
    return np.asarray(logits(model, jnp.asarray(ids, jnp.int32)))


@pytest.mark.parametrize("how", ["auto", "vector", "int8x2", "float"])
@pytest.mark.parametrize("rows", [1, 6])
@pytest.mark.parametrize(
    "spec,shape,axes",
    [
        ("BTD,DKXH->BTKXH", (12, 3, 5, 4), (0,)),
        ("BTKGH,KGHD->BTD", (3, 2, 4, 12), (0, 1, 2)),
        ("BTD,VD->BTV", (40, 12), (1,)),
    ],
)
def test_int8_einsum_equals_einsum_with_the_dequantized_weight(
    rng, monkeypatch, spec, shape, axes, rows, how
):
    monkeypatch.setattr(quantize, "MATMUL", how)
    monkeypatch.setattr(quantize, "VECTOR_MIN_SIZE", 0)  # "auto" takes the vector path at one row
    w = rng.standard_normal(shape).astype(np.float32)
    qw = quantize_array(w, axes)
    assert qw.q.dtype == jnp.int8 and qw.shape == shape
    assert qw.scale.shape == tuple(1 if i in axes else d for i, d in enumerate(shape))
    x_shape = {"BTD,DKXH->BTKXH": (12,), "BTKGH,KGHD->BTD": (3, 2, 4), "BTD,VD->BTV": (12,)}[spec]
    x = jnp.asarray(rng.standard_normal((rows // 3 or 1, min(rows, 3), *x_shape)), jnp.float32)
    got, want = np.asarray(qw.einsum(spec, x)), np.asarray(jnp.einsum(spec, x, qw.dequantize()))
    if how == "int8x2" or (how == "auto" and rows > 1):
        # Activations split into two int8 parts: ~16 bits, so within 1e-4 of the largest output.
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(qw.dequantize()) - w).max() <= np.abs(w).max() / 127


def test_int8_weight_per_layer_slice_keeps_its_layout(rng):
    """Stacked weights are sliced per layer by `lax.scan`: `contracted` counts from the end."""
    w = rng.standard_normal((2, 12, 3, 4)).astype(np.float32)  # [L, D, K, H], D contracted
    qw = quantize_array(w, (1,))
    layer = jax.tree.map(lambda a: a[1], qw)
    assert layer.shape == (12, 3, 4) and layer.q.shape == (3, 4, 12)
    x = jnp.asarray(rng.standard_normal((2, 5, 12)), jnp.float32)
    np.testing.assert_allclose(
        np.asarray(layer.einsum("BTD,DKH->BTKH", x)),
        np.asarray(jnp.einsum("BTD,DKH->BTKH", x, qw.dequantize()[1])),
        rtol=0,
        atol=1e-3,
    )


@pytest.mark.parametrize("how", ["auto", "vector", "int8x2"])
def test_quantized_tiny_model_stays_close_to_float32(monkeypatch, how):
    cfg = tiny_config()
    state = pack_tensors(cfg, random_tensors(cfg).items(), "tiny")
    ref = model_logits(build_model(cfg, state), np.asarray([SAMPLE_IDS]))
    q = quantize_model(build_model(cfg, state))
    kinds = {
        name: type(getattr(q.blocks, name).get_value()) for name in ("wqkv", "wo", "w_gate_up", "w_down")
    }
    assert set(kinds.values()) == {Int8Weight} and isinstance(q.embed.get_value(), Int8Weight)
    assert {n.removeprefix("blocks/") for n in matmul_names(cfg)} >= set(kinds)
    monkeypatch.setattr(quantize, "MATMUL", how)
    got = np.asarray(jax.jit(lambda ids: logits.__wrapped__(q, ids))(jnp.asarray([SAMPLE_IDS], jnp.int32)))
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()  # the real model: 6% (bench note)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75  # 10 of 12 here: random logits are close
    assert sum(x.nbytes for x in jax.tree.leaves(nnx.state(q))) < 0.4 * sum(
        np.asarray(v).nbytes for v in jax.tree.leaves(state)
    )
    # The formulations differ from each other only by activation rounding, far below int8 error.
    monkeypatch.setattr(quantize, "MATMUL", "float")
    exact = np.asarray(jax.jit(lambda ids: logits.__wrapped__(q, ids))(jnp.asarray([SAMPLE_IDS], jnp.int32)))
    assert np.abs(got - exact).max() < 0.05 * np.abs(got - ref).max()


def test_int8_decode_steps_match_float_formulation(monkeypatch):
    """Decode through the runner at batch buckets 1 and 2 (one activation row, then several):
    the shape-picked formulations give the same tokens as exact int8-weight math."""
    from llama_jax.runner import ModelRunner, unpack
    from llama_jax.sampling import SamplingParams, SlotSampling

    cfg = tiny_config()
    state = pack_tensors(cfg, random_tensors(cfg).items(), "tiny")
    monkeypatch.setattr(quantize, "VECTOR_MIN_SIZE", 0)  # the tiny head takes the vector path too
    outs = {}
    for how in ("auto", "float"):
        monkeypatch.setattr(quantize, "MATMUL", how)
        runner = ModelRunner(quantize_model(build_model(cfg, state)), max_slots=2, max_seq_len=64)
        st = runner.init_state()
        row = SlotSampling.from_params([SamplingParams(temperature=0)], [0])
        toks = []
        for slot in range(2):
            st, _ = runner.prefill(st, np.asarray(SAMPLE_IDS[: 5 + slot], np.int32), slot, 0, row)
        for n_active in (1, 1, 2, 2):
            active = np.arange(2) < n_active
            st, out = runner.decode(st, active, 16)
            toks.append(unpack(out)[0][:n_active].tolist())
        outs[how] = toks
    assert outs["auto"] == outs["float"]


@pytest.mark.parametrize("quantize", ["int8", "auto"])
def test_quantized_default_model_answers_paris(quantize):
    """int8, and the default: the Q4_1 file's own 4-bit codes (its Q8_0 embedding as int8)."""
    gen = Generator.from_pretrained(quantize=quantize, max_seq_len=512, max_slots=1)
    if quantize == "auto":
        from llama_jax.quantize import Q4Weight

        wqkv = gen.model.blocks.wqkv.get_value()
        assert isinstance(wqkv, Q4Weight) or getattr(wqkv, "mins", None) is not None  # 4-bit, XLA or kernel
    try:
        out = gen.chat(
            [{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0)
        )
    finally:
        gen.close()
    assert "Paris" in out.text

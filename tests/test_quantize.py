"""int8 weight-only quantization: exact int8 algebra, small logit error, the real model still
answers the France question."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import SAMPLE_IDS, random_tensors, tiny_config

from llama_jax import Generator, SamplingParams
from llama_jax.quantize import CONTRACTED, Int8Weight, quantize_array, quantize_model
from llama_jax.weights import build_model, pack_tensors


@nnx.jit
def logits(model, ids):
    h, _, _ = model.hidden(ids, jnp.arange(ids.shape[1])[None])
    return model.logits(h)


def model_logits(model, ids):
    return np.asarray(logits(model, jnp.asarray(ids, jnp.int32)))


@pytest.mark.parametrize(
    "spec,shape,axes",
    [
        ("BTD,DKXH->BTKXH", (12, 3, 5, 4), (0,)),
        ("BTKGH,KGHD->BTD", (3, 2, 4, 12), (0, 1, 2)),
        ("BTD,VD->BTV", (40, 12), (1,)),
    ],
)
def test_int8_einsum_equals_einsum_with_the_dequantized_weight(rng, spec, shape, axes):
    w = rng.standard_normal(shape).astype(np.float32)
    qw = quantize_array(w, axes)
    assert qw.q.dtype == jnp.int8 and qw.scale.shape == tuple(
        1 if i in axes else d for i, d in enumerate(shape)
    )
    x_shape = {"BTD,DKXH->BTKXH": (2, 3, 12), "BTKGH,KGHD->BTD": (2, 3, 3, 2, 4), "BTD,VD->BTV": (2, 3, 12)}[
        spec
    ]
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    np.testing.assert_allclose(qw.einsum(spec, x), jnp.einsum(spec, x, qw.dequantize()), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(qw.dequantize()) - w).max() <= np.abs(w).max() / 127


def test_quantized_tiny_model_stays_close_to_float32():
    cfg = tiny_config()
    state = pack_tensors(cfg, random_tensors(cfg).items(), "tiny")
    ref = model_logits(build_model(cfg, state), np.asarray([SAMPLE_IDS]))
    q = quantize_model(build_model(cfg, state))
    kinds = {
        name: type(getattr(q.blocks, name).get_value()) for name in ("wqkv", "wo", "w_gate_up", "w_down")
    }
    assert set(kinds.values()) == {Int8Weight} and isinstance(q.embed.get_value(), Int8Weight)
    assert set(CONTRACTED) >= set(kinds)
    got = model_logits(q, np.asarray([SAMPLE_IDS]))
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()  # the real model: 6% (bench note)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75  # 10 of 12 here: random logits are close
    assert sum(x.nbytes for x in jax.tree.leaves(nnx.state(q))) < 0.4 * sum(
        np.asarray(v).nbytes for v in jax.tree.leaves(state)
    )


def test_int8_default_model_answers_paris():
    gen = Generator.from_pretrained(quantize="int8", max_seq_len=512, max_slots=1)
    try:
        out = gen.chat(
            [{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0)
        )
    finally:
        gen.close()
    assert "Paris" in out.text

"""The hand-written CPU kernels (llama_jax/kernels/cpu_kernels.cc): matmuls on packed float32
and int8 weights, decode attention over the cache in place, and the model path that uses them
(equal to the pure-XLA path), plus the fallback when they cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import random_tensors, tiny_config

from llama_jax import cpu_kernels as ck
from llama_jax.model import attend
from llama_jax.quantize import quantize_array, quantize_model
from llama_jax.runner import ModelRunner, unpack
from llama_jax.sampling import SamplingParams, SlotSampling
from llama_jax.weights import build_model, pack_tensors

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not ck.available(), reason="the CPU kernels serve the CPU backend"
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("R", [1, 2, 5, 7, 8, 9, 16, 65, 130])
@pytest.mark.parametrize("N,K", [(8, 24), (24, 20), (40, 3), (24, 400)])
def test_matmul_equals_numpy(rng, dtype, R, N, K):
    """Every row-block shape (a lone row; one block of 2-6, of 7-8; several blocks; two and
    three super blocks of rows), units of two tiles and a last single tile, any K (the kernel
    has no K alignment; 400 spans three blocks of inputs), stacked layers picked by index,
    and skipped padding rows."""
    L = 3
    x = rng.standard_normal((R, K)).astype(np.float32)
    if dtype == "int8":
        w = rng.integers(-127, 128, (L, N, K)).astype(np.int8)
        scale = rng.uniform(0.001, 0.02, (L, N)).astype(np.float32)
    else:
        w, scale = rng.standard_normal((L, N, K)).astype(np.float32), None
    packed = jnp.asarray(ck.pack(w))
    assert packed.shape == (L, N // 8, K, 8)
    assert np.array_equal(np.asarray(ck.unpack(packed)), w)
    for layer in (0, 2):
        want = ck.reference_matmul(x, w[layer], None if scale is None else scale[layer])
        s = None if scale is None else jnp.asarray(scale)
        got = np.asarray(ck.matmul(jnp.asarray(x), packed, s, jnp.int32(layer)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        valid = R // 2
        part = np.asarray(jax.jit(ck.matmul)(jnp.asarray(x), packed, s, jnp.int32(layer), jnp.int32(valid)))
        # (A lone row sums in another order than a block of rows: rounding only.)
        np.testing.assert_allclose(part[:valid], got[:valid], rtol=1e-5, atol=1e-5 * np.abs(want).max())
        assert not part[valid:].any()  # padding rows are zeros, not computed


def test_matmul_rejects_a_layer_out_of_range(rng):
    w = jnp.asarray(ck.pack(rng.standard_normal((2, 8, 16)).astype(np.float32)))
    with pytest.raises(Exception, match="layer in range"):
        np.asarray(ck.matmul(jnp.ones((1, 16), jnp.float32), w, None, jnp.int32(2)))


@pytest.mark.parametrize("cache_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("H", [16, 12])  # vector and scalar paths
def test_attend_equals_xla_attention_over_valid_positions(rng, H, cache_dtype):
    """Rows with 0, 1, some and all cache positions valid, GQA (3 query heads per KV head),
    reading layer 1 of a stacked cache (float32 or float16); garbage past each row's length is
    never read."""
    L, Bmax, S, KV, G = 2, 5, 16, 2, 3
    lengths = np.asarray([0, 1, 7, S], np.int32)
    B = len(lengths)
    k_cache = rng.standard_normal((L, Bmax, S, KV, H)).astype(cache_dtype)
    v_cache = rng.standard_normal((L, Bmax, S, KV, H)).astype(cache_dtype)
    q = rng.standard_normal((B, KV, G, H)).astype(np.float32)
    k_new, v_new = rng.standard_normal((2, B, KV, H)).astype(np.float32)
    got = np.asarray(ck.attend(q, k_new, v_new, k_cache, v_cache, jnp.int32(1), jnp.asarray(lengths)))
    kc, vc = (c[1, :B].astype(np.float32) for c in (k_cache, v_cache))
    want = attend(q[:, None], k_new[:, None], v_new[:, None], kc, vc, lengths)[:, 0]
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)
    poisoned = k_cache.copy()
    for b, n in enumerate(lengths):
        poisoned[1, b, n:] = np.nan
    again = ck.attend(q, k_new, v_new, poisoned, v_cache, jnp.int32(1), jnp.asarray(lengths))
    np.testing.assert_array_equal(np.asarray(again), got)


@pytest.mark.parametrize("H", [16, 12])  # vector and scalar paths
@pytest.mark.parametrize("start", [0, 5, 9])  # no cache, some, all C positions valid
def test_attend_chunk_equals_xla_attention(rng, H, start):
    """A prefill chunk (GQA, 3 query heads per KV head) over `start` valid cache positions and
    itself, causally; padding rows are zeros and never read, nor are cache positions past
    `start`."""
    T, C, KV, G, valid = 7, 9, 2, 3, 5
    q = rng.standard_normal((T, KV, G, H)).astype(np.float32)
    k_new, v_new = rng.standard_normal((2, T, KV, H)).astype(np.float32)
    k_ctx, v_ctx = rng.standard_normal((2, C, KV, H)).astype(np.float32)
    want = np.asarray(
        attend(q[None], k_new[None], v_new[None], k_ctx[None], v_ctx[None], np.asarray([start]))
    )[0]
    if start == 0:
        want_none = np.asarray(attend(q[None], k_new[None], v_new[None], None, None, np.asarray([0])))[0]
        np.testing.assert_allclose(want_none, want, rtol=1e-5, atol=1e-5)
    kp, vp, knp, vnp = k_ctx.copy(), v_ctx.copy(), k_new.copy(), v_new.copy()
    kp[start:], vp[start:], knp[valid:], vnp[valid:] = np.nan, np.nan, np.nan, np.nan
    got = np.asarray(ck.attend_chunk(q, knp, vnp, kp, vp, jnp.int32(start), jnp.int32(valid)))
    np.testing.assert_allclose(got[:valid], want[:valid], rtol=1e-5, atol=1e-5)
    assert not got[valid:].any()
    if start == 0:
        alone = np.asarray(ck.attend_chunk(q, knp, vnp, None, None, 0, valid))
        np.testing.assert_array_equal(alone, got)


@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
def test_chunked_prefill_with_kernels_equals_the_xla_path(kv_dtype):
    """A prompt prefilled in two chunks (the second attends over the first in the cache) and
    decoded: the kernel path gives the XLA path's tokens and log-probabilities, with a float32
    or a float16 KV cache (which the kernels read as float16)."""
    cfg = tiny_config()
    state = pack_tensors(cfg, random_tensors(cfg).items(), "tiny")
    prompt = np.arange(3, 33, dtype=np.int32)
    row = SlotSampling.from_params([SamplingParams(temperature=0.0, top_logprobs=5)], [0])
    outs = {}
    for kernels in (False, True):
        m = build_model(cfg, state)
        if kernels:
            assert ck.pack_model(m)
        runner = ModelRunner(m, max_slots=2, max_seq_len=64, min_prefill_bucket=16, kv_dtype=kv_dtype)
        st = runner.init_state()
        assert st.k.dtype == kv_dtype
        st, first = runner.prefill(st, prompt[:20], 1, 0, row)
        st, second = runner.prefill(st, prompt[20:], 1, 20, row)
        st, step = runner.decode(st, np.asarray([False, True]), 31)
        outs[kernels] = [np.asarray(first), np.asarray(second), np.asarray(step)[1:2]]
    for g, w in zip(outs[True], outs[False], strict=True):
        np.testing.assert_array_equal(unpack(g)[0], unpack(w)[0])
        np.testing.assert_allclose(unpack(g)[1], unpack(w)[1], rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(g[..., 2:7], w[..., 2:7])


def _run(model, prompt, steps: int, slots: int = 3):
    """Greedy prefill into slot 1 plus `steps` decode steps with 2 of `slots` active:
    (tokens, prefill logprob-bearing outputs)."""
    runner = ModelRunner(model, max_slots=slots, max_seq_len=64, min_prefill_bucket=16, kv_dtype="float32")
    state = runner.init_state()
    row = SlotSampling.from_params([SamplingParams(temperature=0.0, top_logprobs=5)], [0])
    state, out = runner.prefill(state, np.asarray(prompt[:5], np.int32), 0, 0, row)
    state, out = runner.prefill(state, np.asarray(prompt, np.int32), 1, 0, row)
    outs = [np.asarray(out)]
    active = np.asarray([True, True] + [False] * (slots - 2))
    for i in range(steps):
        state, out = runner.decode(state, active, len(prompt) + i + 1)
        outs.append(np.asarray(out)[:2])
    return outs


@pytest.mark.parametrize("quant", [None, "int8"])
def test_packed_model_equals_the_xla_path(quant):
    """The tiny model through the runner with and without the kernels: same greedy tokens
    and top-5 alternatives, log-probabilities within float rounding (int8 compared with
    exact int8-weight math, the XLA "float" formulation)."""
    from llama_jax import quantize

    cfg = tiny_config()
    state = pack_tensors(cfg, random_tensors(cfg).items(), "tiny")
    prompt = list(range(3, 23))  # 20 tokens: a padded 32-token chunk

    def make(kernels: bool):
        m = build_model(cfg, state)
        if quant:
            quantize_model(m, quant)
        if kernels:
            assert ck.pack_model(m) and m.kernels
            assert isinstance(m.blocks.wqkv.get_value(), ck.PackedWeight)
        return m

    old = quantize.MATMUL
    quantize.MATMUL = "float"
    try:
        want = _run(make(False), prompt, 6)
    finally:
        quantize.MATMUL = old
    got = _run(make(True), prompt, 6)
    for g, w in zip(got, want, strict=True):
        tok_g, lp_g = unpack(g)
        tok_w, lp_w = unpack(w)
        np.testing.assert_array_equal(tok_g, tok_w)
        np.testing.assert_allclose(lp_g, lp_w, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(g[..., 2:7], w[..., 2:7])  # top-5 ids


def test_default_model_with_and_without_kernels_agree(smollm2):
    """The real model (float32): the kernels' logits equal XLA's to float rounding on a chat
    prompt, prefill and decode, and greedy text is the same."""
    from llama_jax import Generator

    assert smollm2.runner.cfg and smollm2.loaded.model.kernels
    plain = Generator.from_pretrained(max_seq_len=512, max_slots=4, kernels=False, quantize="none")
    assert not plain.loaded.model.kernels
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(temperature=0)
    a, b = smollm2.chat(msgs, params, max_tokens=12), plain.chat(msgs, params, max_tokens=12)
    assert a.token_ids == b.token_ids and "Paris" in a.text
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-3)


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT / "tests",
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


CHECK = """
    import logging
    logging.basicConfig(level=logging.WARNING)
    from tiny import random_tensors, tiny_config
    from llama_jax import cpu_kernels
    from llama_jax.weights import build_model, pack_tensors
    cfg = tiny_config()
    m = build_model(cfg, pack_tensors(cfg, random_tensors(cfg).items(), "tiny"))
    print("packed", cpu_kernels.pack_model(m), m.kernels)
"""


def test_kernels_can_be_turned_off():
    proc = _python(CHECK, {"LLAMA_JAX_CPU_KERNELS": "0"})
    assert proc.returncode == 0, proc.stderr
    assert "packed False False" in proc.stdout


def test_a_failed_build_falls_back_to_xla_with_a_warning(tmp_path):
    """No working compiler: a warning that names the problem, and the model keeps the XLA path."""
    proc = _python(CHECK, {"CXX": "/bin/false", "LLAMA_JAX_KERNEL_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "packed False False" in proc.stdout
    assert "CPU kernels unavailable" in proc.stderr and "failed to build" in proc.stderr


def test_quantized_rows_keep_their_int8_layout(rng):
    """pack_weight of an Int8Weight keeps q and the per-channel scales (no requantization)."""
    w = rng.standard_normal((2, 16, 3, 8)).astype(np.float32)  # [L, D, K, H], D contracted
    qw = quantize_array(w, (1,))
    packed = ck.pack_weight(qw, (1,), stacked=True)
    assert packed.data.dtype == jnp.int8 and packed.shape == w.shape
    q = np.asarray(ck.unpack(packed.data))  # [L, N, K] with N = 3*8 outputs, K = 16 inputs
    np.testing.assert_array_equal(q.reshape(2, 3, 8, 16), np.asarray(qw.q))
    x = jnp.asarray(rng.standard_normal((2, 1, 16)), jnp.float32)
    got = packed.at_layer(jnp.int32(1)).einsum("BTD,DKH->BTKH", x)
    want = jnp.einsum("BTD,DKH->BTKH", x, qw.dequantize()[1])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 20, 64])
def test_top_k_equals_lax_top_k(rng, k):
    """Values and indices as lax.top_k's, ties in index order (rows full of repeated values,
    -inf and the -1e30 of masked tokens)."""
    x = rng.standard_normal((5, 300)).astype(np.float32)
    x[1] = np.round(x[1])  # many ties
    x[2, ::2] = -np.inf
    x[3] = -1e30
    x[3, [7, 250, 9]] = [2.0, 2.0, 1.0]
    x[4, :] = 0.5
    vals, ids = ck.top_k(jnp.asarray(x), k)
    want_vals, want_ids = jax.lax.top_k(jnp.asarray(x), k)
    np.testing.assert_array_equal(np.asarray(vals), np.asarray(want_vals))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))


def test_sampling_with_the_kernel_top_k_draws_the_same_tokens(rng):
    """sample() and top_logprobs() on the kernel path: identical tokens and alternatives for
    rows with top-k (within and past the candidate count), top-p, min-p and plain temperature."""
    from llama_jax.sampling import sample, top_logprobs

    params = [
        SamplingParams(temperature=0.8, top_k=5, seed=1, top_logprobs=3),
        SamplingParams(temperature=1.0, top_k=100, seed=2),
        SamplingParams(temperature=0.7, top_p=0.9, seed=3, top_logprobs=20),
        SamplingParams(temperature=1.3, min_p=0.05, seed=4),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=5),
    ]
    s = jax.tree.map(jnp.asarray, SlotSampling.from_params(params, [0] * len(params)))
    logits = jnp.asarray(rng.standard_normal((len(params), 1000)) * 3, jnp.float32)
    for step in range(5):
        pos = jnp.full((len(params),), step, jnp.int32)
        a = jax.jit(lambda x, p: sample(x, s, p, True))(logits, pos)
        b = jax.jit(lambda x, p: sample(x, s, p, False))(logits, pos)
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
        np.testing.assert_allclose(np.asarray(a[1]), np.asarray(b[1]), rtol=1e-6)
    ta, tb = top_logprobs(logits, s, True), top_logprobs(logits, s, False)
    np.testing.assert_array_equal(np.asarray(ta[0]), np.asarray(tb[0]))
    np.testing.assert_allclose(np.asarray(ta[1]), np.asarray(tb[1]), rtol=1e-6)

"""Loading weights in their own precision (llama_jax/params.py, weights.load_model): every 4-bit
GGUF type read as codes against the `gguf` package's dequantization, the format each file and
`quantize` choice gives, every format on the kernel and XLA paths against float math, the
4-bit kernel against numpy, and a few-hundred-MB file loading within its memory bound."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import Q, model_logits, quantize, random_tensors, tiny_config, write_gguf, write_hf_folder

from llama_jax import cpu_kernels as ck
from llama_jax import params
from llama_jax.gguf import GGUFFile, q4_rows, q8_rows
from llama_jax.quantize import Q4Weight, Q8Weight, q4_from_rows, q4_to_rows, q8_from_rows, q8_to_rows
from llama_jax.weights import load_model, plan_formats

SAMPLE_IDS = np.array([[1, 5, 9, 33, 2, 17, 60, 4]])


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_4bit_rows_equal_the_gguf_package_dequantization(rng, qtype):
    """Codes, scales and mins read from the file's bytes reproduce gguf's own dequantization
    (Q4_0 and Q4_1 exactly; Q4_K's d * sc rounded once to float16)."""
    w = rng.standard_normal((24, 512)).astype(np.float32)
    raw = quantize(w, qtype)
    want = gguf.quants.dequantize(raw, qtype)
    rows = q4_rows(raw, qtype.name)
    assert rows.q.shape == (24, 256) and rows.scale.shape == rows.min.shape == (24, 16)
    got = q4_to_rows(*rows)
    tol = 0 if qtype != Q.Q4_K else 1e-3 * np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)


def test_q8_0_rows_are_the_files_codes_and_scales(rng):
    """A Q8_0 tensor read as codes and scales reproduces gguf's own dequantization exactly, and
    float rows quantized the same way (`q8_from_rows`) are Q8_0's codes."""
    w = rng.standard_normal((24, 512)).astype(np.float32)
    raw = quantize(w, Q.Q8_0)
    rows = q8_rows(raw)
    assert rows.q.dtype == np.int8 and rows.q.shape == (24, 512) and rows.scale.shape == (24, 16)
    np.testing.assert_array_equal(q8_to_rows(*rows), gguf.quants.dequantize(raw, Q.Q8_0))
    q, scale = q8_from_rows(w)
    np.testing.assert_array_equal(scale, rows.scale)
    assert np.abs(q.astype(int) - rows.q).max() <= 1  # ties may round either way


def test_float_rows_to_4bit_and_back(rng):
    w = rng.standard_normal((5, 3, 64)).astype(np.float32)
    back = q4_to_rows(*q4_from_rows(w))
    step = (w.reshape(5, 3, 2, 32).max(-1) - w.reshape(5, 3, 2, 32).min(-1)) / 15
    assert np.all(np.abs(back - w).reshape(5, 3, 2, 32) <= step[..., None] * 0.51 + 1e-3)


def _bits(**kw):
    cfg = tiny_config()
    return cfg, {n: kw.get(n.rsplit("/", 1)[-1], 32) for n in params.specs(cfg)}


def test_auto_keeps_the_files_precision_and_never_fewer_bits():
    cfg, bits = _bits(wqkv=4, wo=4, w_gate_up=4, w_down=6, embed=8)
    f = plan_formats(cfg, "auto", bits, None)
    assert f["blocks/wqkv"] == f["blocks/wo"] == f["blocks/w_gate_up"] == "q4"
    assert f["blocks/w_down"] == "q8" and f["embed"] == "q8"  # Q6_K, Q8_0: 8-bit groups, not 4 bits
    assert set(plan_formats(cfg, "auto", {}, None).values()) == {"float"}  # F16/F32, safetensors
    assert set(plan_formats(cfg, "none", bits, None).values()) == {"float"}
    assert set(plan_formats(cfg, None, bits, None).values()) == {"float"}
    assert set(plan_formats(cfg, "int8", bits, None).values()) == {"int8"}
    assert set(plan_formats(cfg, "q8", bits, None).values()) == {"q8"}
    q4 = plan_formats(cfg, "q4", bits, None)
    assert q4["blocks/w_down"] == "q4" and q4["embed"] == "q8"  # the head stays wide unless 4-bit in the file
    on_mesh = set(plan_formats(cfg, "auto", bits, mesh=object()).values())
    assert on_mesh == {"int8"}  # no groups over a mesh
    with pytest.raises(ValueError, match="quantize must be one of"):
        plan_formats(cfg, "int4", bits, None)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """gguf_file(qtype): the tiny model as a GGUF of that type (norms F32, as llama.cpp writes
    them), with its exact float values, dequantized by the gguf package, as a Hugging Face
    folder."""
    made = {}

    def get(qtype):
        if qtype not in made:
            cfg = tiny_config()
            tensors = random_tensors(cfg)
            tmp = tmp_path_factory.mktemp(qtype.name)
            path = write_gguf(tmp / f"tiny-{qtype.name.lower()}.gguf", cfg, tensors, qtype=qtype)
            exact = dict(GGUFFile(path).tensors(cfg))
            made[qtype] = cfg, path, write_hf_folder(tmp / "dequantized", cfg, exact)
        return made[qtype]

    return get


@pytest.fixture(scope="module")
def q4_file(gguf_file):
    return gguf_file(Q.Q4_0)


@pytest.mark.parametrize(
    "qtype,fmt,exact",
    [(Q.Q4_0, Q4Weight, True), (Q.Q8_0, Q8Weight, True), (Q.Q5_0, Q8Weight, False)],
    ids=["Q4_0", "Q8_0", "Q5_0"],
)
@pytest.mark.parametrize("kernels", [False, True])
def test_a_quantized_file_loads_in_its_own_precision(gguf_file, qtype, fmt, exact, kernels, monkeypatch):
    """auto keeps a file's precision: Q4_0 as 4-bit groups, Q8_0 as 8-bit groups of its own
    codes, Q5_0 as 8-bit groups (never fewer bits), packed for the kernels when they serve.
    The logits equal the float model of the file's dequantized weights (the kernel path within
    its 16-bit activations' rounding: split 0; the default split's 8-bit groups are pinned by
    the kernel tests below, as a random tiny model amplifies any rounding); Q5_0's within its
    requantization to 8 bits."""
    if kernels and not ck.available():
        pytest.skip("no CPU kernels on this platform")
    monkeypatch.setenv("LLAMA_JAX_Q4_SPLIT", "0")
    cfg, path, reference = gguf_file(qtype)
    loaded = load_model(path, kernels=kernels)
    wqkv = loaded.model.blocks.wqkv.get_value()
    if kernels:
        assert isinstance(wqkv, ck.PackedWeight) and wqkv.kind == ("q4" if fmt is Q4Weight else "q8")
        assert wqkv.mins is None  # Q4_0: every min is -8 * its scale, not stored
    else:
        assert isinstance(wqkv, fmt)
        assert wqkv.shape == (cfg.n_layers, cfg.dim, cfg.n_kv_heads, cfg.group + 2, cfg.head_dim)
    if exact and not kernels:  # the file's own codes and scales
        np.testing.assert_array_equal(
            np.asarray(wqkv.dequantize()),
            np.asarray(load_model(reference, quantize="none", kernels=False).model.blocks.wqkv.get_value()),
        )
    want = model_logits(load_model(reference, kernels=False).model, SAMPLE_IDS)
    got = model_logits(loaded.model, SAMPLE_IDS)
    if exact:
        np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max(), rtol=0)
        assert (got.argmax(-1) == want.argmax(-1)).all()
    else:  # requantized: half the error of int8 with per-channel scales (this random tiny
        # model amplifies any rounding: 0.032 against 0.064 of the largest logit)
        err = np.abs(got - want).max()
        per_channel = model_logits(load_model(path, quantize="int8", kernels=False).model, SAMPLE_IDS)
        assert err < 0.05 * np.abs(want).max() and err < 0.75 * np.abs(per_channel - want).max()


def test_4bit_codes_as_uint4_compute_the_same_weights(q4_file, monkeypatch):
    """On GPU and TPU the XLA path keeps 4-bit codes as jnp.uint4 (XLA reads 4-bit operands
    natively there); forced here on CPU, the model computes the same logits as with bytes."""
    _, path, _ = q4_file
    monkeypatch.setenv("LLAMA_JAX_INT4", "0")
    packed = load_model(path, kernels=False)
    monkeypatch.setenv("LLAMA_JAX_INT4", "1")
    int4 = load_model(path, kernels=False)
    w = int4.model.blocks.wqkv.get_value()
    assert w.q.dtype == jnp.uint4 and w.shape == packed.model.blocks.wqkv.get_value().shape
    np.testing.assert_array_equal(
        np.asarray(w.dequantize()), np.asarray(packed.model.blocks.wqkv.get_value().dequantize())
    )
    want = model_logits(packed.model, SAMPLE_IDS)
    np.testing.assert_allclose(
        model_logits(int4.model, SAMPLE_IDS), want, rtol=0, atol=1e-5 * np.abs(want).max()
    )


@pytest.mark.parametrize("quant", ["none", "int8", "q4", "q8"])
def test_every_format_on_the_kernel_path_equals_the_xla_path(q4_file, quant, monkeypatch):
    if not ck.available():
        pytest.skip("no CPU kernels on this platform")
    monkeypatch.setenv("LLAMA_JAX_Q4_SPLIT", "0")  # 16-bit activations (as above)
    _, _, reference = q4_file  # a float (safetensors) source, converted as asked
    xla = model_logits(load_model(reference, quantize=quant, kernels=False).model, SAMPLE_IDS)
    packed = load_model(reference, quantize=quant, kernels=True)
    assert packed.model.kernels
    got = model_logits(packed.model, SAMPLE_IDS)
    np.testing.assert_allclose(got, xla, atol=2e-3 * np.abs(xla).max(), rtol=0)


def test_bfloat16_weights_stay_bfloat16_without_a_float32_copy(q4_file):
    _, _, reference = q4_file
    loaded = load_model(reference, dtype="bfloat16", quantize="none", kernels=False)
    assert loaded.model.blocks.wqkv.get_value().dtype == jnp.bfloat16
    assert loaded.model.embed.get_value().dtype == jnp.bfloat16


def q4_activations(x: np.ndarray, split: float) -> tuple[np.ndarray, np.ndarray]:
    """The 4-bit kernel's activations in float64: per row and group of 32, int8 codes h of step
    d = max|x| / 127, plus a second part d / 254 * l where max|x| > split * rms(row). Also the
    bound on each group's rounding error per input: d / 2, or d / 508 with the second part."""
    x = np.asarray(x, np.float32)
    R, K = x.shape
    g = x.reshape(R, K // 32, 32)
    amax = np.abs(g).max(-1, keepdims=True)
    # the codes rounded as the kernel's float32 code rounds them: x * inv - h is one fused
    # multiply-add (rounded in float64 math, the second part differed at ~0.4% of inputs)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    h = np.rint(g * inv)
    fma = (g.astype(np.float64) * inv - h).astype(np.float32)
    lo = np.clip(np.rint(fma * np.float32(254)), -127, 127)
    x64, amax = np.asarray(x, np.float64), amax.astype(np.float64)
    two = amax > split * np.sqrt((x64**2).mean(-1))[:, None, None]
    err = (amax / 127 * np.where(two, 1 / 508, 1 / 2))[..., 0]
    return ((h + np.where(two, lo, 0) / 254) * amax / 127).reshape(R, K), err


def q4_reference(x, q, scale, mn, split):
    """y = x . w^T for w = scale * codes + min, as the kernel computes it: codes against the
    quantized activations, mins against the exact group sums of x (float64)."""
    codes = ck_unpack(q).astype(np.float64)  # [N, G, 32]
    s, m = np.asarray(scale, np.float64), np.asarray(mn, np.float64)  # [N, G]
    xq = q4_activations(x, split)[0].reshape(len(x), -1, 32)
    sums = np.asarray(x, np.float64).reshape(len(x), -1, 32).sum(-1)  # [R, G]
    return np.einsum("rgk,ngk,ng->rn", xq, codes, s) + sums @ m.T


def ck_unpack(q):
    from llama_jax.quantize import unpack_nibbles

    return unpack_nibbles(np.asarray(q))


@pytest.mark.skipif(not ck.available(), reason="no CPU kernels on this platform")
@pytest.mark.parametrize("R", [1, 2, 3, 5, 8, 9, 17, 130])
@pytest.mark.parametrize("N,K", [(8, 32), (24, 64), (40, 96)])
def test_q4_matmul_equals_numpy(rng, R, N, K):
    """Every row block (a lone row, blocks of 2-8, super blocks), any multiple of 32 inputs,
    stacked layers by index, skipped padding rows, symmetric (Q4_0, no mins) and asymmetric
    weights, and every activation split (all groups 16-bit, the default, all 8-bit): the 4-bit
    kernel equals float64 numpy of the same activation rounding, and float64 numpy of the
    dequantized weight within that rounding."""
    L = 2
    q, scale, mn = q4_from_rows(rng.standard_normal((L, N, K)).astype(np.float32))
    sym = (-8 * scale.astype(np.float32)).astype(np.float16)  # Q4_0: min = -8 scale
    x = rng.standard_normal((R, K)).astype(np.float32)
    x[:, 3] *= 40  # an outlier channel: its group gets the second part at the default split
    for mins, packed_mins in ((mn, True), (sym, False)):
        data, ps, pm = (jnp.asarray(a) for a in ck.pack_q4(q, scale, mins))
        assert data.shape == (L, N // 8, K // 32, 128) and ps.shape == (L, N // 8, K // 32, 8)
        assert ck.symmetric(scale, mins) != packed_mins
        pm = pm if packed_mins else None
        for layer in range(L):
            w = q4_to_rows(q[layer], scale[layer], mins[layer])
            for split in (0.0, ck.SPLIT, 1e30):
                want = q4_reference(x, q[layer], scale[layer], mins[layer], split)
                got = np.asarray(ck.matmul_q4(jnp.asarray(x), data, ps, pm, jnp.int32(layer), split=split))
                np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
                # |x - x~| <= d / 2 per input (d / 508 with a second part), against scale * codes
                # (the mins meet the exact sums of x): the product's bound
                err = q4_activations(x, split)[1]  # [R, G]
                sq = ck_unpack(q[layer]).sum(-1) * scale[layer].astype(np.float64)  # [N, G]
                bound = err @ sq.T * 1.001 + 1e-5 * np.abs(want).max()
                assert (np.abs(got - ck.reference_matmul(x, w)) <= bound).all()
                if split == ck.SPLIT:
                    default = got
            valid = R // 2
            part = np.asarray(
                jax.jit(ck.matmul_q4)(jnp.asarray(x), data, ps, pm, jnp.int32(layer), jnp.int32(valid))
            )
            np.testing.assert_array_equal(part[:valid], default[:valid])
            assert not part[valid:].any()


@pytest.mark.skipif(not ck.available(), reason="no CPU kernels on this platform")
@pytest.mark.parametrize("R", [1, 2, 3, 5, 8, 9, 17, 130])
@pytest.mark.parametrize("N,K", [(8, 32), (24, 64), (40, 96)])
def test_q8_matmul_equals_numpy(rng, R, N, K):
    """The 8-bit group kernel, as the 4-bit one above: every row block, stacked layers by index,
    skipped padding rows, every activation split, and a code of -128 (Q8_0 files may hold it;
    its magnitude is 128 as an unsigned byte)."""
    L = 2
    q, scale = q8_from_rows(rng.standard_normal((L, N, K)).astype(np.float32))
    q[0, 1, 5] = -128
    data, ps = (jnp.asarray(a) for a in ck.pack_q8(q, scale))
    assert (
        data.shape == (L, N // 8, K // 32, 256)
        and data.dtype == jnp.int8
        and ps.shape == (L, N // 8, K // 32, 8)
    )
    x = rng.standard_normal((R, K)).astype(np.float32)
    x[:, 3] *= 40
    for layer in range(L):
        w = q8_to_rows(q[layer], scale[layer]).astype(np.float64)
        for split in (0.0, ck.SPLIT, 1e30):
            xa, err = q4_activations(x, split)
            want = xa @ w.T
            got = np.asarray(ck.matmul_q8(jnp.asarray(x), data, ps, jnp.int32(layer), split=split))
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
            bound = err @ np.abs(w).reshape(N, K // 32, 32).sum(-1).T * 1.001 + 1e-5 * np.abs(want).max()
            assert (np.abs(got - ck.reference_matmul(x, w)) <= bound).all()
        valid = R // 2
        part = np.asarray(jax.jit(ck.matmul_q8)(jnp.asarray(x), data, ps, jnp.int32(layer), jnp.int32(valid)))
        np.testing.assert_array_equal(
            part[:valid], np.asarray(ck.matmul_q8(jnp.asarray(x[:valid]), data, ps, jnp.int32(layer)))
        )
        assert not part[valid:].any()


@pytest.mark.skipif(not ck.available(), reason="no CPU kernels on this platform")
@pytest.mark.parametrize("bits", [4, 8])
def test_a_rows_grouped_product_does_not_depend_on_its_batch(rng, bits):
    """Activations are quantized row by row, and each row's sums run in the same order whatever
    block it falls in: a row alone and in batches of every size gives the same bits (a seeded
    request must not change with the traffic beside it)."""
    w = rng.standard_normal((64, 256)).astype(np.float32)
    if bits == 4:
        data, ps, pm = (jnp.asarray(a) for a in ck.pack_q4(*q4_from_rows(w)))

        def product(x):
            return np.asarray(ck.matmul_q4(jnp.asarray(x), data, ps, pm))
    else:
        data, ps = (jnp.asarray(a) for a in ck.pack_q8(*q8_from_rows(w)))

        def product(x):
            return np.asarray(ck.matmul_q8(jnp.asarray(x), data, ps))

    x = rng.standard_normal((17, 256)).astype(np.float32)
    x[::3, 40] *= 30  # some rows with an outlier group, some without
    alone = [product(x[r : r + 1]) for r in range(17)]
    for R in (2, 5, 8, 9, 17):
        together = product(x[:R])
        for r in range(R):
            np.testing.assert_array_equal(together[r], alone[r][0])


@pytest.mark.skipif(not ck.available(), reason="no CPU kernels on this platform")
@pytest.mark.parametrize("bits", [4, 8])
def test_packed_grouped_embedding_rows_equal_the_weights_rows(rng, bits):
    from llama_jax.quantize import quantize_q4, quantize_q8

    w = (quantize_q4 if bits == 4 else quantize_q8)(rng.standard_normal((64, 96)).astype(np.float32), (1,))
    packed = ck.pack_weight(w, (1,), stacked=False)
    ids = jnp.array([[0, 5, 63], [9, 17, 8]])
    np.testing.assert_array_equal(np.asarray(packed.take_rows(ids)), np.asarray(w.take_rows(ids)))


def test_a_duplicate_tensor_is_a_load_error(q4_file):
    cfg, _, _ = q4_file
    asm = params.Assembler(cfg, "dup", {}, np.float32, kernels=False)
    w = np.zeros((cfg.dim,), np.float32)
    asm.add("model.norm.weight", w)
    from llama_jax.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="appears twice"):
        asm.add("model.norm.weight", w)


MEMORY_CHECK = """
import json, sys
from llama_jax.weights import load_model
import jax

def status(key):  # this process's own (ru_maxrss would include the parent's at fork)
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

jax.numpy.zeros(1).block_until_ready()
base = status("VmRSS:")
loaded = load_model(sys.argv[1])
peak = status("VmHWM:")
leaves = jax.tree.leaves(jax.tree.map(lambda x: x, __import__("flax").nnx.state(loaded.model)))
weights = sum(x.nbytes for x in leaves if hasattr(x, "nbytes"))
print(json.dumps(dict(base=base, peak=peak, weights=weights, seconds=loaded.load_seconds)))
"""


@pytest.mark.slow
def test_a_few_hundred_mb_file_loads_within_its_memory_bound(tmp_path):
    """A random-weight Q4_0 GGUF of SmolLM2-1.7B's widths (dim 2048, 32 KV heads, ffn 8192, 6
    of its 24 layers, the default vocabulary: ~280 MB) loads in a fresh process whose peak RSS stays within 1.3x its resident
    weights + 300 MB (a whole-model float32 copy alone would be 4.6x)."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "bench"))
    from bench_scale import write_gguf as write_big

    path = tmp_path / "big-q4_0.gguf"
    write_big(path, (6, 2048, 32, 32, 8192), "Q4_0")
    assert 250e6 < path.stat().st_size < 450e6
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEMORY_CHECK), str(path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["weights"] < 1.2 * path.stat().st_size  # 4-bit (5 bits with scale and min), not widened
    assert r["peak"] <= 1.3 * r["weights"] + 300e6, r


def test_the_cpu_kernels_build_wherever_they_can():
    """On x86-64 Linux with a C++ compiler the kernels must build: the kernel tests skip where
    they cannot, so without this a broken build would pass unnoticed."""
    import os
    import platform
    import shutil

    if not (sys.platform == "linux" and platform.machine() == "x86_64"):
        pytest.skip("the kernels are required on x86-64 Linux only")
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        pytest.skip("no C++ compiler")
    if os.environ.get("LLAMA_JAX_CPU_KERNELS", "1").lower() in ("0", "false", "no", "off"):
        pytest.skip("LLAMA_JAX_CPU_KERNELS=0")
    assert ck.available(), "the CPU kernels failed to build: see the warning in the log"


@pytest.mark.skipif(not ck.available(), reason="no CPU kernels on this platform")
def test_every_weight_format_is_a_weight_and_a_float_array_is_not(rng, monkeypatch):
    """The model dispatches on `Weight` alone (model.dense, embed_lookup): each format's class
    must satisfy it, and a float array must take the plain einsum path."""
    monkeypatch.setenv("LLAMA_JAX_Q4_SPLIT", "0")  # the packed 4-bit weight's 16-bit activations
    from llama_jax.quantize import quantize_array, quantize_q4, quantize_q8
    from llama_jax.weight import LayerStack, Weight

    w = rng.standard_normal((64, 96)).astype(np.float32)
    int8, q4, q8 = quantize_array(w, (1,)), quantize_q4(w, (1,)), quantize_q8(w, (1,))
    exact = [(w, w)] + [(f, np.asarray(f.dequantize())) for f in (int8, q4, q8)]
    cases = exact[1:] + [(ck.pack_weight(f, (1,), stacked=False), ref) for f, ref in exact]
    x = jnp.asarray(rng.standard_normal((3, 96)).astype(np.float32))
    for f, ref in cases:  # each computes with its own (dequantized) values
        assert isinstance(f, Weight), type(f)
        want = np.asarray(x) @ ref.T
        np.testing.assert_allclose(
            np.asarray(f.einsum("TD,VD->TV", x)), want, rtol=0, atol=1e-3 * np.abs(want).max()
        )
    assert not isinstance(jnp.asarray(w), Weight)
    # the layer scan passes a weight whole only when it reads its layer in place
    stacked = ck.pack_weight(np.stack([w, w]), (2,), stacked=True)
    assert isinstance(stacked, LayerStack) and not isinstance(jnp.asarray(w), LayerStack)
    assert not any(isinstance(f, LayerStack) for f, _ in exact[1:])

"""Tests for llama_jax/gguf.py: the GGUF parser against the `gguf` package's own reader, Q/K row
un-permutation, tensor types, and corrupt or unsupported files (each a `ModelLoadError` that
names the file and the problem, raised before anything large is allocated)."""

import re
import struct
import time
import tracemalloc

import gguf
import numpy as np
import pytest
from tiny import (
    SAMPLE_IDS,
    gguf_name,
    llama_cpp_permute,
    model_logits,
    quantize,
    random_tensors,
    tiny_config,
    write_gguf,
    write_hf_folder,
)

from llama_jax.errors import ModelLoadError
from llama_jax.gguf import GGUFFile, hf_name, permute_rope_rows, unpermute_rope_rows
from llama_jax.weights import load_model

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def cfg():
    return tiny_config()


@pytest.fixture(scope="module")
def tensors(cfg):
    return random_tensors(cfg)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory, cfg, tensors):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", cfg, tensors)


@pytest.fixture(scope="module")
def reader(gguf_path):
    return gguf.GGUFReader(gguf_path)


# ---- names and layouts ----------------------------------------------------------------------


@pytest.mark.parametrize("n_heads", [1, 2, 4])
def test_permute_rope_rows_is_llama_cpp_permute_and_unpermute_inverts_it(n_heads):
    rng = np.random.default_rng(n_heads)
    for shape in [(n_heads * 16, 64), (n_heads * 16,)]:  # weights and biases
        w = rng.normal(size=shape).astype(np.float32)
        np.testing.assert_array_equal(permute_rope_rows(w, n_heads), llama_cpp_permute(w, n_heads))
        np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, n_heads), n_heads), w)


def test_hf_name_maps_every_llama_cpp_tensor_name_back():
    cfg = tiny_config(qkv_bias=True, tie_embeddings=False)
    names = [*random_tensors(cfg), "rope_freqs"]
    for name in names:
        assert hf_name(gguf_name(name)) == name
    assert hf_name("blk.0.attn_rot_embd") is None
    assert hf_name("blk.x.attn_q.weight") is None


# ---- parsing --------------------------------------------------------------------------------


def test_metadata_and_tensor_infos_match_the_gguf_package_reader(gguf_path, reader):
    gg = GGUFFile(gguf_path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}  # the header, as fields
    assert set(gg.metadata) == set(fields)
    for key, field in fields.items():
        expected = field.contents()
        if isinstance(expected, float):
            assert gg.metadata[key] == pytest.approx(expected, rel=1e-7), key
        else:
            assert gg.metadata[key] == expected, key
    assert [i.name for i in gg.infos] == [t.name for t in reader.tensors]
    for info, t in zip(gg.infos, reader.tensors, strict=True):
        assert info.shape == tuple(int(d) for d in reversed(t.shape))
        assert info.qtype == t.tensor_type
        assert info.offset == t.data_offset
        assert info.nbytes == t.n_bytes


def test_config_comes_from_metadata_and_missing_output_means_tied(tmp_path, gguf_path, cfg):
    assert GGUFFile(gguf_path).config() == cfg
    untied = tiny_config(tie_embeddings=False)
    path = write_gguf(tmp_path / "untied.gguf", untied, random_tensors(untied))
    assert GGUFFile(path).config() == untied


def test_f32_tensors_read_back_exactly_with_qk_rows_unpermuted(gguf_path, cfg, tensors):
    got = dict(GGUFFile(gguf_path).tensors(cfg))
    assert set(got) == set(tensors)
    for name, w in tensors.items():
        np.testing.assert_array_equal(got[name], w, err_msg=name)


def test_qwen2_tensors_are_not_unpermuted(tmp_path):
    cfg = tiny_config(architecture="qwen2", qkv_bias=True)
    tensors = random_tensors(cfg)
    path = write_gguf(tmp_path / "qwen2.gguf", cfg, tensors, arch="qwen2")
    gg = GGUFFile(path)
    assert gg.config() == cfg
    got = dict(gg.tensors(cfg))
    for name, w in tensors.items():
        np.testing.assert_array_equal(got[name], w, err_msg=name)


def test_larger_alignment_is_honoured(tmp_path, cfg, tensors):
    path = write_gguf(tmp_path / "aligned.gguf", cfg, tensors, metadata_overrides={"general.alignment": 256})
    gg = GGUFFile(path)
    assert all(i.offset % 256 == 0 for i in gg.infos)
    got = dict(gg.tensors(cfg))
    np.testing.assert_array_equal(
        got["model.layers.1.self_attn.k_proj.weight"], tensors["model.layers.1.self_attn.k_proj.weight"]
    )


# ---- tensor types ---------------------------------------------------------------------------

# K-quants need rows of 256 values: a wider model for them.
K_CONFIG = dict(dim=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=512)
TYPES = {
    Q.F16: {},
    Q.BF16: {},
    Q.Q8_0: {},
    Q.Q4_0: {},
    Q.Q4_1: {},
    Q.Q4_K: K_CONFIG,
    Q.Q5_K: K_CONFIG,
    Q.Q6_K: K_CONFIG,
}


@pytest.fixture(scope="module")
def f32_models(tmp_path_factory):
    """config overrides (as a key) -> (cfg, tensors, f32 logits)"""
    out = {}
    for overrides in ({}, K_CONFIG):
        cfg = tiny_config(**overrides)
        tensors = random_tensors(cfg, seed=1)
        path = write_gguf(tmp_path_factory.mktemp("f32") / "f32.gguf", cfg, tensors)
        out[tuple(overrides.items())] = (cfg, tensors, model_logits(load_model(path).model, SAMPLE_IDS))
    return out


@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda t: t.name)
def test_quantized_tensors_load_as_their_dequantized_values(tmp_path, f32_models, qtype):
    cfg, tensors, f32_logits = f32_models[tuple(TYPES[qtype].items())]
    path = write_gguf(tmp_path / f"{qtype.name}.gguf", cfg, tensors, qtype=qtype)
    gg = GGUFFile(path)
    for info in gg.infos:
        assert info.qtype == (qtype if len(info.shape) == 2 else Q.F32), info.name

    expected = {
        name: gguf.quants.dequantize(quantize(w, qtype), qtype).reshape(w.shape) if w.ndim == 2 else w
        for name, w in tensors.items()
    }
    for name, w in expected.items():  # the encoders are sane: close to, not equal to, the f32 weights
        if w.ndim == 2:
            err = np.sqrt(np.mean((w - tensors[name]) ** 2) / np.mean(tensors[name] ** 2))
            assert 0 < err < 0.15, (name, err)
    got = dict(gg.tensors(cfg))
    for name, w in expected.items():
        np.testing.assert_array_equal(got[name], w, err_msg=name)

    # Loaded as float (quantize="none"), the model is exactly the dequantized one (written as
    # f32), and close to the f32 model.
    reference = write_hf_folder(tmp_path / "dequantized", cfg, expected)
    logits = model_logits(load_model(path, quantize="none").model, SAMPLE_IDS)
    np.testing.assert_allclose(logits, model_logits(load_model(reference).model, SAMPLE_IDS), atol=1e-5)
    # Relative RMS errors: the random model amplifies its weights' error about 7x (5.5-7.7 seen).
    weight_error = np.sqrt(
        sum(np.sum((expected[k] - w) ** 2) for k, w in tensors.items())
        / sum(np.sum(w**2) for w in tensors.values())
    )
    logit_error = np.sqrt(np.mean((logits - f32_logits) ** 2) / np.mean(f32_logits**2))
    assert logit_error < 10 * weight_error, (logit_error, weight_error)


def test_mixed_types_like_the_default_model(tmp_path, cfg, tensors):
    # SmolLM2's file: Q4_1 matrices, a Q8_0 embedding, F32 vectors.
    path = write_gguf(
        tmp_path / "mixed.gguf", cfg, tensors, qtype=Q.Q4_1, tensor_types={"token_embd.weight": Q.Q8_0}
    )
    gg = GGUFFile(path)
    types = {i.name: Q(i.qtype) for i in gg.infos}
    assert types["token_embd.weight"] == Q.Q8_0 and types["blk.0.attn_k.weight"] == Q.Q4_1
    assert types["blk.0.attn_norm.weight"] == Q.F32
    got = dict(gg.tensors(cfg))
    for name, qtype in [
        ("model.embed_tokens.weight", Q.Q8_0),
        ("model.layers.0.self_attn.k_proj.weight", Q.Q4_1),
    ]:
        w = tensors[name]
        np.testing.assert_array_equal(
            got[name], gguf.quants.dequantize(quantize(w, qtype), qtype).reshape(w.shape)
        )


# ---- bad files ------------------------------------------------------------------------------


def _raises(path, problem: str, loader=load_model):
    """Loading `path` raises a ModelLoadError naming the file, whose message matches `problem`."""
    with pytest.raises(ModelLoadError) as e:
        loader(path)
    assert str(path) in str(e.value), str(e.value)
    assert re.search(problem, str(e.value)), str(e.value)
    return e.value


def _copy(src, dst, patches=(), size=None):
    data = bytearray(src.read_bytes())
    for offset, fmt, value in patches:
        struct.pack_into(fmt, data, offset, value)
    dst.write_bytes(bytes(data[:size]))
    return dst


def _tensor_field(reader, name: str, part: str) -> int:
    """File offset of one field of a tensor info: "n_dims", "dims", "type" or "offset"."""
    t = next(t for t in reader.tensors if t.name == name)
    sizes = [p.nbytes for p in t.field.parts]  # name length, name, n_dims, dims, type, offset
    index = {"n_dims": 2, "dims": 3, "type": 4, "offset": 5}[part]
    return t.field.offset + sum(sizes[:index])


def test_missing_file(tmp_path):
    _raises(tmp_path / "absent.gguf", "no such file")
    _raises(tmp_path / "absent.gguf", "not found", loader=GGUFFile)


def test_wrong_magic(tmp_path, gguf_path):
    _raises(_copy(gguf_path, tmp_path / "bad.gguf", [(0, "4s", b"GGML")]), "not a GGUF file: bad magic")


@pytest.mark.parametrize("version", [1, 4, 0xFFFFFFFF])
def test_unsupported_version(tmp_path, gguf_path, version):
    _raises(
        _copy(gguf_path, tmp_path / "v.gguf", [(4, "<I", version)]), f"unsupported GGUF version {version}"
    )


TRUNCATED = "truncated|past the end|more than the file can hold|outside the file|only \\d+ bytes"


@pytest.mark.parametrize(
    "where",
    ["header", "after header", "metadata key", "token list", "tensor info", "tensor data start", "last byte"],
)
def test_truncated_file(tmp_path, gguf_path, reader, where):
    tokens = reader.fields["tokenizer.ggml.tokens"]
    last = reader.tensors[-1]
    cut = {
        "header": 12,
        "after header": 24,
        "metadata key": reader.fields["general.name"].offset + 10,
        "token list": tokens.offset + sum(p.nbytes for p in tokens.parts) // 2,
        "tensor info": reader.tensors[3].field.offset + 5,
        "tensor data start": reader.tensors[0].data_offset + 7,
        "last byte": last.data_offset + last.n_bytes - 1,
    }[where]
    _raises(_copy(gguf_path, tmp_path / "cut.gguf", size=cut), TRUNCATED)


def test_tensor_info_pointing_outside_the_file(tmp_path, gguf_path, reader):
    offset = _tensor_field(reader, "blk.0.attn_k.weight", "offset")
    _raises(
        _copy(gguf_path, tmp_path / "far.gguf", [(offset, "<Q", 2**40)]),
        "'blk.0.attn_k.weight'.*outside the file",
    )
    dims = _tensor_field(reader, "blk.0.attn_k.weight", "dims")
    _raises(
        _copy(gguf_path, tmp_path / "big.gguf", [(dims + 8, "<Q", 2**40)]),
        "'blk.0.attn_k.weight'.*outside the file",
    )


@pytest.mark.parametrize(
    "patch, problem",
    [
        ("n_tensors", "more than the file can hold"),
        ("n_kv", "more than the file can hold"),
        ("token count", "2305843009213693952 strings runs past the end"),
        ("key length", "truncated GGUF: needs 2305843009213693952 bytes"),
        ("n_dims", "claims 4294967295 dimensions"),
    ],
)
def test_absurd_counts_fail_fast_without_allocating(tmp_path, gguf_path, reader, patch, problem):
    tokens = reader.fields["tokenizer.ggml.tokens"]
    where = {
        "n_tensors": (8, "<Q", 2**63 - 1),
        "n_kv": (16, "<Q", 2**63 - 1),
        "token count": (tokens.offset + sum(p.nbytes for p in tokens.parts[:4]), "<Q", 2**61),
        "key length": (reader.fields["general.name"].offset, "<Q", 2**61),
        "n_dims": (_tensor_field(reader, "blk.1.attn_q.weight", "n_dims"), "<I", 2**32 - 1),
    }[patch]
    path = _copy(gguf_path, tmp_path / "absurd.gguf", [where])
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        _raises(path, problem, loader=GGUFFile)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 0.5
    assert peak < 2**20, peak  # well under the file's own 400 kB


def test_invalid_alignment(tmp_path, cfg, tensors):
    path = write_gguf(tmp_path / "align.gguf", cfg, tensors, metadata_overrides={"general.alignment": 48})
    _raises(path, "invalid general.alignment 48")


def test_missing_tensor(tmp_path, cfg, tensors):
    partial = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.down_proj.weight"}
    path = write_gguf(tmp_path / "missing.gguf", cfg, partial)
    _raises(path, r"missing tensor 'model\.layers\.1\.mlp\.down_proj\.weight'")


def test_missing_lm_head_is_read_as_tied(tmp_path):
    cfg = tiny_config(tie_embeddings=False)
    tensors = random_tensors(cfg)
    del tensors["lm_head.weight"]
    path = write_gguf(tmp_path / "tied.gguf", cfg, tensors)
    assert load_model(path).config.tie_embeddings


@pytest.mark.parametrize(
    "overrides, problem",
    [
        ({"general.architecture": "gpt-neox"}, "unsupported architecture 'gpt-neox'"),
        ({"general.architecture": None}, "unsupported architecture None"),
        ({"llama.block_count": None}, "missing metadata key 'llama.block_count'"),
        ({"llama.embedding_length": None}, "missing metadata key 'llama.embedding_length'"),
    ],
)
def test_unsupported_or_incomplete_metadata(tmp_path, cfg, tensors, overrides, problem):
    _raises(write_gguf(tmp_path / "meta.gguf", cfg, tensors, metadata_overrides=overrides), problem)


@pytest.mark.parametrize(
    "qtype, problem",
    [
        (Q.Q8_1, "'blk.0.ffn_down.weight' has unsupported type Q8_1"),
        (Q.I8, "'blk.0.ffn_down.weight' has unsupported type I8"),
        (Q.Q8_K, r"'blk.0.ffn_down.weight' shape \[128, 64\] does not fit Q8_K blocks of 256"),
        (99, "'blk.0.ffn_down.weight' has unknown type 99"),
    ],
    ids=lambda v: getattr(v, "name", str(v)) if not isinstance(v, str) else "",
)
def test_unsupported_tensor_type(tmp_path, gguf_path, reader, qtype, problem):
    # Each of these types takes fewer bytes than F32, so the patched tensor still lies in the file.
    where = _tensor_field(reader, "blk.0.ffn_down.weight", "type")
    _raises(_copy(gguf_path, tmp_path / "type.gguf", [(where, "<I", int(qtype))]), problem)


@pytest.mark.parametrize(
    "overrides, problem",
    [
        ({"llama.attention.head_count_kv": 3}, "not a multiple"),
        ({"llama.attention.head_count_kv": 0}, "head_count_kv"),
        ({"llama.attention.head_count": 6}, "has 64 rows, but the metadata's 6 heads"),
        ({"llama.block_count": "two"}, "block_count"),
        ({"llama.attention.layer_norm_rms_epsilon": [1.0]}, "layer_norm_rms_epsilon"),
        ({"general.alignment": "abc"}, "alignment"),
    ],
)
def test_invalid_metadata_values(tmp_path, cfg, tensors, overrides, problem):
    _raises(write_gguf(tmp_path / "values.gguf", cfg, tensors, metadata_overrides=overrides), problem)


@pytest.mark.parametrize("key", ["llama.block_count", "llama.feed_forward_length", "llama.embedding_length"])
def test_metadata_claiming_huge_sizes_fails_before_allocating(tmp_path, cfg, tensors, key):
    """A config read from metadata must not size allocations beyond what the file holds."""
    path = write_gguf(tmp_path / "huge.gguf", cfg, tensors, metadata_overrides={key: 2**31})
    tracemalloc.start()
    start = time.perf_counter()
    try:
        _raises(path, "describes .* weights but the file holds only")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 5
    assert peak < 64 * 2**20

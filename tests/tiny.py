"""Tiny random Llama-family models for tests, written as GGUF files or Hugging Face folders.

Everything here is built from first principles (llama.cpp's converter and the Hugging Face
layouts), not from `llama_jax`, so a test that loads these files checks the library against
the formats rather than against itself. Only `LlamaConfig` is imported: it is the vocabulary
of the tests.

    cfg = tiny_config()                      # 2 layers, D=64, N=4, K=2, H=16, F=128
    tensors = random_tensors(cfg)            # canonical HF names, float32, [out, in]
    write_gguf(tmp / "tiny.gguf", cfg, tensors, qtype=gguf.GGMLQuantizationType.Q8_0)
    write_hf_folder(tmp / "tiny-hf", cfg, tensors, shards=3)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from llama_jax.config import LlamaConfig

Q = gguf.GGMLQuantizationType
QK_K = 256  # K-quant super-block

# ---- vocabulary -----------------------------------------------------------------------------

# SmolLM2's ChatML template, with a shorter default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# GGUF-style "left right" merges, in priority order.
_MERGES = (
    "Ġ t|h e|Ġt he|i n|Ġ a|e r|o n|Ġ s|r e|a t|Ġ w|o u|Ġ i|i s|Ġ c|e n|l l|Ġ o|Ġ h|Ġh e|e ll|H ell|Hell o"
).split("|")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of byte-level BPE vocabularies)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(chars.items()))


@dataclasses.dataclass(frozen=True)
class TinyVocab:
    """A byte-level BPE vocabulary laid out like SmolLM2's: control tokens first, then the 256
    byte symbols, then the merged tokens."""

    tokens: tuple[str, ...]
    token_types: tuple[int, ...]  # GGUF token types: 1 normal, 3 control
    merges: tuple[str, ...]
    specials: tuple[str, ...]
    bos_id: int
    eos_id: int
    chat_template: str

    def id(self, token: str) -> int:
        return self.tokens.index(token)


def _make_vocab() -> TinyVocab:
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    tokens = [*specials, *bytes_to_unicode().values()]
    for merge in _MERGES:
        left, right = merge.split(" ")
        assert left in tokens and right in tokens, merge
        tokens.append(left + right)
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return TinyVocab(
        tuple(tokens),
        tuple(types),
        tuple(_MERGES),
        specials,
        bos_id=1,
        eos_id=2,
        chat_template=CHATML_TEMPLATE,
    )


TINY_VOCAB = _make_vocab()
# A 12-token sequence (bytes, merged tokens, control tokens) for logits checks; one length for
# every test, so `model_logits` compiles once per config.
SAMPLE_IDS = (1, 259, 261, 269, 114, 117, 111, 2, 13, 281, 47, 0)

# ---- config and weights ---------------------------------------------------------------------


def tiny_config(**overrides: Any) -> LlamaConfig:
    """2 layers, D=64, N=4 heads, K=2 KV heads, H=16, F=128, context 512, the tiny vocabulary.

    norm_eps is 2**-16, exact in float32, so configs read back from GGUF and config.json are equal.
    """
    values: dict[str, Any] = dict(
        vocab_size=len(TINY_VOCAB.tokens),
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=128,
        norm_eps=2.0**-16,
        rope_theta=10000.0,
        tie_embeddings=True,
        qkv_bias=False,
        context_length=512,
        bos_id=TINY_VOCAB.bos_id,
        eos_ids=(TINY_VOCAB.eos_id,),
        architecture="llama",
    )
    values.update(overrides)
    return LlamaConfig(**values)


def random_tensors(cfg: LlamaConfig, seed: int = 0, tied: bool | None = None) -> dict[str, np.ndarray]:
    """Random weights under canonical Hugging Face names, float32, `[out, in]`.

    `tied` None follows `cfg.tie_embeddings`; untied adds `lm_head.weight`. Scales are large
    enough that logits are far from uniform and greedy decoding does not repeat one token.
    """
    rng = np.random.default_rng(seed)
    D, N, K, H, F, V = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size

    def normal(*shape: int, std: float) -> np.ndarray:
        return rng.normal(0.0, std, shape).astype(np.float32)

    def proj(n_out: int, n_in: int) -> np.ndarray:  # twice Xavier: attention and MLP outweigh the embedding
        return normal(n_out, n_in, std=2 * n_in**-0.5)

    def norm_weight() -> np.ndarray:
        return (1.0 + normal(D, std=0.1)).astype(np.float32)

    t = {"model.embed_tokens.weight": normal(V, D, std=0.5)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm_weight()
        t[p + "self_attn.q_proj.weight"] = proj(N * H, D)
        t[p + "self_attn.k_proj.weight"] = proj(K * H, D)
        t[p + "self_attn.v_proj.weight"] = proj(K * H, D)
        if cfg.qkv_bias:
            t[p + "self_attn.q_proj.bias"] = normal(N * H, std=0.2)
            t[p + "self_attn.k_proj.bias"] = normal(K * H, std=0.2)
            t[p + "self_attn.v_proj.bias"] = normal(K * H, std=0.2)
        t[p + "self_attn.o_proj.weight"] = proj(D, N * H)
        t[p + "post_attention_layernorm.weight"] = norm_weight()
        t[p + "mlp.gate_proj.weight"] = proj(F, D)
        t[p + "mlp.up_proj.weight"] = proj(F, D)
        t[p + "mlp.down_proj.weight"] = proj(D, F)
    t["model.norm.weight"] = norm_weight()
    if not (cfg.tie_embeddings if tied is None else tied):
        t["lm_head.weight"] = normal(V, D, std=0.5)
    return t


def llama3_rope_factors(cfg: LlamaConfig) -> np.ndarray:
    """Per-frequency divisors [H/2] for llama3 RoPE scaling, as llama.cpp's converter writes them
    (`rope_freqs.weight`); ones when `cfg` has no llama3 scaling."""
    s = cfg.rope_scaling
    half = cfg.head_dim // 2
    if s is None or s.kind != "llama3":
        return np.ones(half, np.float32)
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    factors = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(s.factor)
        else:
            smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            factors.append(1.0 / ((1 - smooth) / s.factor + smooth))
    return np.asarray(factors, np.float32)


# ---- GGUF -----------------------------------------------------------------------------------

_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "rope_freqs": "rope_freqs.weight",
}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's tensor name for a canonical Hugging Face name."""
    if hf_name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[hf_name]
    _, _, layer, sub = hf_name.split(".", 3)
    return f"blk.{layer}.{_GGUF_LAYER[sub]}"


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """`LlamaModel.permute` of llama.cpp's convert_hf_to_gguf.py: each head's rows go from the
    split-halves RoPE layout to the interleaved one."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape, 2)


def _pack_scales_k(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [n, 8] -> the 12-byte K-quant field (inverse of
    `gguf.quants.Q4_K.get_scale_min`)."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return out


def _affine_k(x: np.ndarray, qmax: int) -> tuple[np.ndarray, ...]:
    """Q4_K/Q5_K: x [n, 8, 32] ~ d*sc*q - dmin*m; returns (d, dmin, sc, m, q) with q in 0..qmax."""
    mins = np.maximum(-x.min(-1), 0.0)
    scales = (x.max(-1) + mins) / qmax
    d = (scales.max(-1) / 63).astype(np.float16)
    dmin = (mins.max(-1) / 63).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.nan_to_num(np.rint(scales / d.astype(np.float32)[:, None])).clip(0, 63).astype(np.uint8)
        m = np.nan_to_num(np.rint(mins / dmin.astype(np.float32)[:, None])).clip(0, 63).astype(np.uint8)
        step = (d.astype(np.float32)[:, None] * sc)[..., None]
        offset = (dmin.astype(np.float32)[:, None] * m)[..., None]
        q = np.nan_to_num(np.rint((x + offset) / step)).clip(0, qmax).astype(np.uint8)
    return d, dmin, sc, m, q


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine_k(blocks.reshape(-1, 8, 32), 15)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k(sc, m), qs], axis=1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine_k(blocks.reshape(-1, 8, 32), 31)
    low = q & 15
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(-1, 128)
    qh = np.zeros((q.shape[0], 32), np.uint8)
    for j in range(8):
        qh |= ((q[:, j] >> 4) & 1) << j
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k(sc, m), qh, qs], axis=1)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    x = blocks.reshape(-1, 16, 16)  # sixteen sub-blocks of 16, one int8 scale each
    scales = np.abs(x).max(-1) / 31
    d = (scales.max(-1) / 127).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.nan_to_num(np.rint(scales / d.astype(np.float32)[:, None])).clip(0, 127).astype(np.int8)
        step = (d.astype(np.float32)[:, None] * sc)[..., None]
        q = (np.nan_to_num(np.rint(x / step)).clip(-32, 31) + 32).astype(np.uint8).reshape(-1, QK_K)
    n = q.shape[0]
    lo = q.reshape(n, 2, 2, 64) & 15  # [half, nibble, byte]
    ql = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(n, 128)
    hi = q.reshape(n, 2, 4, 32) >> 4  # [half, 2-bit field, byte]
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=1)


_K_ENCODERS = {Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}


def quantize(w: np.ndarray, qtype: Q) -> np.ndarray:
    """`gguf.quants.quantize`, plus simple (round-to-nearest) Q4_K/Q5_K/Q6_K encoders, which the
    gguf package lacks. Returns what `gguf.quants.dequantize(_, qtype)` reads back."""
    if qtype not in _K_ENCODERS:
        return gguf.quants.quantize(w, qtype)
    rows = w.reshape(-1, w.shape[-1]).astype(np.float32)
    if rows.shape[-1] % QK_K:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {QK_K} values, got {rows.shape[-1]}")
    blocks = _K_ENCODERS[qtype](rows.reshape(-1, QK_K))
    return blocks.reshape(*w.shape[:-1], -1)


def _infer_value(key: str, value: Any) -> tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]:
    V = gguf.GGUFValueType
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], V):
        return value[0], value[1], None
    if isinstance(value, bool):
        return value, V.BOOL, None
    if isinstance(value, int):
        return value, V.UINT32, None
    if isinstance(value, float):
        return value, V.FLOAT32, None
    if isinstance(value, str):
        return value, V.STRING, None
    if isinstance(value, list | tuple):
        return list(value), V.ARRAY, None
    raise TypeError(f"cannot write metadata {key!r} = {value!r}")


def gguf_metadata(cfg: LlamaConfig, arch: str = "llama") -> dict[str, Any]:
    """The metadata llama.cpp's converter writes for `cfg` and the tiny vocabulary (arch keys
    prefixed with `arch`); `general.architecture` is added by the writer."""
    meta: dict[str, Any] = {
        "general.name": "tiny-random",
        f"{arch}.context_length": cfg.context_length,
        f"{arch}.embedding_length": cfg.dim,
        f"{arch}.block_count": cfg.n_layers,
        f"{arch}.feed_forward_length": cfg.ffn_dim,
        f"{arch}.attention.head_count": cfg.n_heads,
        f"{arch}.attention.head_count_kv": cfg.n_kv_heads,
        f"{arch}.attention.key_length": cfg.head_dim,
        f"{arch}.attention.value_length": cfg.head_dim,
        f"{arch}.rope.dimension_count": cfg.head_dim,
        f"{arch}.rope.freq_base": float(cfg.rope_theta),
        f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.norm_eps),
        f"{arch}.vocab_size": cfg.vocab_size,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": list(TINY_VOCAB.tokens),
        "tokenizer.ggml.token_type": list(TINY_VOCAB.token_types),
        "tokenizer.ggml.merges": list(TINY_VOCAB.merges),
        "tokenizer.ggml.bos_token_id": TINY_VOCAB.bos_id,
        "tokenizer.ggml.eos_token_id": TINY_VOCAB.eos_id,
        "tokenizer.ggml.padding_token_id": TINY_VOCAB.eos_id,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": TINY_VOCAB.chat_template,
    }
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "linear":
        meta[f"{arch}.rope.scaling.type"] = "linear"
        meta[f"{arch}.rope.scaling.factor"] = float(cfg.rope_scaling.factor)
    return meta


def write_gguf(
    path: str | Path,
    cfg: LlamaConfig,
    tensors: Mapping[str, np.ndarray],
    qtype: Q = Q.F32,
    arch: str | None = None,
    metadata_overrides: Mapping[str, Any] | None = None,
    tensor_types: Mapping[str, Q] | None = None,
) -> Path:
    """Write `tensors` (canonical HF names, `[out, in]`) as llama.cpp would: GGUF names, Q/K
    rows (and biases) permuted for interleaved RoPE on llama/mistral, matrices in `qtype`
    (vectors, and rows that are not whole blocks, stay F32), llama3 scaling as `rope_freqs`.

    `metadata_overrides`: key -> value (type inferred; `(value, GGUFValueType)` to force one;
    None removes the key). `tensor_types`: GGUF tensor name -> type, overriding `qtype`. `arch`
    (default `cfg.architecture`) names `general.architecture` and the metadata key prefix.
    """
    path = Path(path)
    arch = arch or cfg.architecture
    writer = gguf.GGUFWriter(path, arch)
    meta = gguf_metadata(cfg, arch)
    meta.update(metadata_overrides or {})
    alignment = meta.get("general.alignment")
    if isinstance(alignment, int) and alignment > 0 and not alignment & (alignment - 1):
        writer.data_alignment = alignment
    for key, value in meta.items():
        if value is None:
            for kv in writer.kv_data:
                kv.pop(key, None)
            continue
        writer.add_key_value(key, *_infer_value(key, value))
    tensors = dict(tensors)
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3" and "rope_freqs" not in tensors:
        tensors["rope_freqs"] = llama3_rope_factors(cfg)
    permute = arch in ("llama", "mistral")
    for name, w in tensors.items():
        w = np.asarray(w, np.float32)
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = llama_cpp_permute(w, cfg.n_heads)
        elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = llama_cpp_permute(w, cfg.n_kv_heads)
        gname = gguf_name(name)
        t = (tensor_types or {}).get(gname, qtype if w.ndim > 1 else Q.F32)
        block = gguf.GGML_QUANT_SIZES[t][0]
        if t == Q.F32 or w.shape[-1] % block:
            writer.add_tensor(gname, w)
        elif t == Q.F16:
            writer.add_tensor(gname, w.astype(np.float16))
        else:
            writer.add_tensor(gname, quantize(w, t), raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---- Hugging Face folder --------------------------------------------------------------------


_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def hf_config_json(cfg: LlamaConfig, tied: bool) -> dict[str, Any]:
    """The `config.json` transformers writes for `cfg` (model_type from `cfg.architecture`)."""
    model_type = cfg.architecture
    out: dict[str, Any] = {
        "architectures": [_HF_ARCHITECTURES.get(model_type, "LlamaForCausalLM")],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": tied,
        "bos_token_id": TINY_VOCAB.bos_id,
        "eos_token_id": TINY_VOCAB.eos_id,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if model_type != "qwen2":
        out["attention_bias"] = cfg.qkv_bias
    s = cfg.rope_scaling
    if s is not None and s.kind == "llama3":
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position,
        }
    elif s is not None:
        out["rope_scaling"] = {"rope_type": s.kind, "factor": s.factor}
    return out


def tokenizer_json() -> str:
    """The tiny vocabulary as a Hugging Face `tokenizer.json` (GPT-2 style byte-level BPE)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(TINY_VOCAB.tokens)}
    merges = [tuple(m.split(" ")) for m in TINY_VOCAB.merges]
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in TINY_VOCAB.specials])
    return tok.to_str()


def write_hf_folder(
    path: str | Path,
    cfg: LlamaConfig,
    tensors: Mapping[str, np.ndarray],
    shards: int = 1,
    dtype: str = "float32",
) -> Path:
    """A Hugging Face model folder: config.json, `model.safetensors` (or `shards` files and
    `model.safetensors.index.json`), tokenizer.json and tokenizer_config.json (ChatML)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    tied = "lm_head.weight" not in tensors
    config = hf_config_json(cfg, tied)
    config["torch_dtype"] = dtype
    (path / "config.json").write_text(json.dumps(config, indent=2))
    arrays = {
        name: np.ascontiguousarray(np.asarray(w, np.float32).astype(np_dtype)) for name, w in tensors.items()
    }
    if shards == 1:
        save_file(arrays, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = list(arrays)
        weight_map = {}
        for i, part in enumerate(np.array_split(np.arange(len(names)), shards)):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file(
                {names[j]: arrays[names[j]] for j in part}, str(path / fname), metadata={"format": "pt"}
            )
            weight_map.update({names[j]: fname for j in part})
        index = {
            "metadata": {"total_size": int(sum(a.nbytes for a in arrays.values()))},
            "weight_map": weight_map,
        }
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "tokenizer.json").write_text(tokenizer_json())
    added = {
        str(i): {
            "content": s,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
            "special": True,
        }
        for i, s in enumerate(TINY_VOCAB.specials)
    }
    tok_config = {
        "add_bos_token": False,
        "added_tokens_decoder": added,
        "bos_token": TINY_VOCAB.tokens[TINY_VOCAB.bos_id],
        "eos_token": TINY_VOCAB.tokens[TINY_VOCAB.eos_id],
        "pad_token": TINY_VOCAB.tokens[TINY_VOCAB.eos_id],
        "chat_template": TINY_VOCAB.chat_template,
        "model_max_length": cfg.context_length,
        "tokenizer_class": "GPT2Tokenizer",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return path


# ---- running a loaded model -----------------------------------------------------------------

_GRAPHDEFS: dict[Any, Any] = {}


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens):
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    h, _, _ = model.hidden(tokens, positions)
    return model.logits(h)


def model_logits(model: Any, tokens: Any) -> np.ndarray:
    """float32 logits [B, T, V] of a whole sequence from position 0 (`Llama.hidden` then
    `Llama.logits`). Compiled once per config and shape: models with equal configs share it."""
    graphdef, state = nnx.split(model)
    graphdef = _GRAPHDEFS.setdefault((model.cfg, str(model.dtype)), graphdef)
    return np.asarray(_logits(graphdef, state, jnp.asarray(np.atleast_2d(tokens), jnp.int32)))


def write_hub_cache(
    cache: str | Path, repo: str, folder: str | Path, ref: str = "main", commit: str = ""
) -> Path:
    """`folder`'s files as the snapshot of `repo` at `ref` in a Hugging Face cache, in the
    layout `huggingface_hub` reads (models--org--name/{blobs,refs,snapshots}: each file a blob
    named by its hash, linked from the snapshot; `refs/<ref>` holds the commit). The snapshot
    folder is returned."""
    import hashlib
    import os
    import shutil

    commit = commit or hashlib.sha1(f"{repo}@{ref}".encode()).hexdigest()
    root = Path(cache) / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    for src in sorted(Path(folder).iterdir()):
        data = src.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            shutil.copyfile(src, blob)
        link = snapshot / src.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs" / ref).write_text(commit)
    return snapshot

"""`LlamaConfig`: the shape and constants of one Llama-family model.

Built from GGUF metadata (`from_gguf_metadata`) or a Hugging Face `config.json`
(`from_hf_config`). One config covers Llama 1/2/3/3.x, Mistral, Qwen2, SmolLM and TinyLlama;
anything outside that family is refused here, with the file named, before any weight is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llama_jax.errors import ModelLoadError

# GGUF `general.architecture` values and HF `model_type` values this config describes.
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")
HF_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `kind` is "llama3" or "linear"."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int  # D
    n_layers: int  # L
    n_heads: int  # N
    n_kv_heads: int  # K
    head_dim: int  # H
    ffn_dim: int  # F
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False
    context_length: int = 2048
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    architecture: str = "llama"

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def group(self) -> int:  # G: query heads per KV head
        return self.n_heads // self.n_kv_heads

    def num_params(self) -> int:
        d, f, h = self.dim, self.ffn_dim, self.head_dim
        attn = d * h * (self.n_heads * 2 + self.n_kv_heads * 2)
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + head + self.n_layers * per_layer + d

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], path: object = "<gguf>") -> LlamaConfig:
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ModelLoadError(
                path, f"unsupported architecture {arch!r} (supported: {', '.join(GGUF_ARCHITECTURES)})"
            )

        def num(key: str, cast: type, default: Any = None, positive: bool = True) -> Any:
            """`{arch}.{key}` cast to int or float; the error names the key."""
            full = f"{arch}.{key}"
            if full not in meta:
                if default is None:
                    raise ModelLoadError(path, f"missing metadata key {full!r}")
                return default
            value = meta[full]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ModelLoadError(path, f"metadata {full!r} must be a number, got {value!r}")
            if positive and not value > 0:
                raise ModelLoadError(path, f"metadata {full!r} must be positive, got {value!r}")
            return cast(value)

        dim = num("embedding_length", int)
        n_heads = num("attention.head_count", int)
        n_kv = num("attention.head_count_kv", int, n_heads)
        if n_heads % n_kv:
            raise ModelLoadError(path, f"head_count={n_heads} is not a multiple of head_count_kv={n_kv}")
        tokens = meta.get("tokenizer.ggml.tokens")
        scaling = None
        if meta.get(f"{arch}.rope.scaling.type") == "linear":
            scaling = RopeScaling("linear", num("rope.scaling.factor", float))
        eos = [meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")]
        try:
            return cls(
                vocab_size=num(
                    "vocab_size", int, len(tokens) if isinstance(tokens, list) and tokens else None
                ),
                dim=dim,
                n_layers=num("block_count", int),
                n_heads=n_heads,
                n_kv_heads=n_kv,
                head_dim=num("attention.key_length", int, dim // n_heads),
                ffn_dim=num("feed_forward_length", int),
                norm_eps=num("attention.layer_norm_rms_epsilon", float, 1e-5),
                rope_theta=num("rope.freq_base", float, 10000.0),
                rope_scaling=scaling,
                tie_embeddings=False,  # decided by the loader: no output.weight tensor means tied
                qkv_bias=arch == "qwen2",  # the loader also turns it on when bias tensors exist
                context_length=num("context_length", int, 2048),
                bos_id=meta.get("tokenizer.ggml.bos_token_id"),
                eos_ids=tuple(dict.fromkeys(int(e) for e in eos if isinstance(e, int))),
                architecture=arch,
            )
        except (TypeError, ValueError) as e:
            raise ModelLoadError(path, f"invalid model metadata: {e}") from None

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any] | Path | str) -> LlamaConfig:
        path: object = "<config.json>"
        if not isinstance(cfg, Mapping):
            path = Path(cfg)
            try:
                cfg = json.loads(Path(path).read_text())
            except FileNotFoundError:
                raise ModelLoadError(path, "config.json not found") from None
            except (OSError, ValueError) as e:
                raise ModelLoadError(path, f"cannot read config.json: {e}") from None
        model_type = cfg.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise ModelLoadError(
                path, f"unsupported model_type {model_type!r} (supported: {', '.join(HF_MODEL_TYPES)})"
            )
        try:
            dim = int(cfg["hidden_size"])
            n_heads = int(cfg["num_attention_heads"])
            n_kv = int(cfg.get("num_key_value_heads") or n_heads)
            rs = cfg.get("rope_scaling") or None
            scaling = None
            if rs:
                kind = rs.get("rope_type", rs.get("type"))
                if kind == "llama3":
                    scaling = RopeScaling(
                        "llama3",
                        float(rs["factor"]),
                        float(rs.get("low_freq_factor", 1.0)),
                        float(rs.get("high_freq_factor", 4.0)),
                        int(rs.get("original_max_position_embeddings", 8192)),
                    )
                elif kind == "linear":
                    scaling = RopeScaling("linear", float(rs["factor"]))
                elif kind not in (None, "default"):
                    raise ModelLoadError(path, f"unsupported rope_scaling type {kind!r}")
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                dim=dim,
                n_layers=int(cfg["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=n_kv,
                head_dim=int(cfg.get("head_dim") or dim // n_heads),
                ffn_dim=int(cfg["intermediate_size"]),
                norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(cfg.get("rope_theta", 10000.0)),
                rope_scaling=scaling,
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
                context_length=int(cfg.get("max_position_embeddings", 2048)),
                bos_id=cfg.get("bos_token_id"),
                eos_ids=tuple(int(e) for e in eos_ids),
                architecture=model_type,
            )
        except KeyError as e:
            raise ModelLoadError(path, f"config.json lacks required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelLoadError(path, f"invalid value in config.json: {e}") from None


def rope_frequencies(cfg: LlamaConfig) -> list[float]:
    """Inverse frequencies [H/2] for RoPE, with llama3/linear scaling applied (host side)."""
    h = cfg.head_dim
    inv = [1.0 / (cfg.rope_theta ** (2 * i / h)) for i in range(h // 2)]
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s.kind == "linear":
        return [f / s.factor for f in inv]
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / s.factor)
        else:
            smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return out

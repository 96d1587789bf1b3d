"""The model's parameter table: one row per parameter of `model.py`, read by everything that
handles parameters by name (the model's constructor, the loader, quantization, CPU-kernel
packing, sharding), so a new weight or architecture is a row here and its use in the model.

A row names the parameter (its "/"-joined NNX path), its per-layer axes in `model.py`'s shape
letters, the letters its matmul contracts (none: a vector), the letter split over a mesh's
`model` axis (Megatron style: heads and MLP columns, output projections on their input
dimension, the vocabulary of the embedding and head), whether it is stacked over layers, and
the file tensors (canonical Hugging Face names, per layer for stacked ones) whose rows make its
output rows (a fused weight's come from several: `wqkv` from q, k and v).
"""

from __future__ import annotations

import dataclasses
import math

from llama_jax.config import LlamaConfig


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    letters: str  # per-layer axes (model.py's letters; C: the gate/up pair)
    contracts: str  # the letters its matmul contracts; "" for a vector
    split: str  # the letter split over the mesh's `model` axis; "" replicated
    stacked: bool
    sources: tuple[str, ...]
    needs: str = ""  # the config flag it exists under ("qkv_bias"; "untied": not tie_embeddings)


_ATTN = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")

TABLE: tuple[Param, ...] = (
    Param("embed", "VD", "D", "V", False, ("model.embed_tokens.weight",)),
    Param("norm", "D", "", "", False, ("model.norm.weight",)),
    Param("blocks/attn_norm", "D", "", "", True, ("input_layernorm.weight",)),
    Param("blocks/wqkv", "DKXH", "D", "K", True, _ATTN),
    Param("blocks/wo", "KGHD", "KGH", "K", True, ("self_attn.o_proj.weight",)),
    Param("blocks/mlp_norm", "D", "", "", True, ("post_attention_layernorm.weight",)),
    Param("blocks/w_gate_up", "DCF", "D", "F", True, ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    Param("blocks/w_down", "FD", "F", "F", True, ("mlp.down_proj.weight",)),
    Param(
        "blocks/bqkv", "KXH", "", "K", True, tuple(s.replace(".weight", ".bias") for s in _ATTN), "qkv_bias"
    ),
    Param("lm_head", "VD", "D", "V", False, ("lm_head.weight",), "untied"),
)
BY_NAME = {p.name: p for p in TABLE}


def sizes(cfg: LlamaConfig) -> dict[str, int]:
    """Each shape letter's size for a config."""
    return dict(
        V=cfg.vocab_size,
        D=cfg.dim,
        K=cfg.n_kv_heads,
        G=cfg.group,
        X=cfg.group + 2,
        H=cfg.head_dim,
        F=cfg.ffn_dim,
        C=2,
    )


def present(p: Param, cfg: LlamaConfig) -> bool:
    if p.needs == "untied":
        return not cfg.tie_embeddings
    return not p.needs or bool(getattr(cfg, p.needs))


def contracted_axes(name: str) -> tuple[int, ...]:
    """The axes a parameter's matmul contracts, counted in its whole (stacked) shape."""
    p = BY_NAME[name]
    lead = 1 if p.stacked else 0
    return tuple(lead + p.letters.index(c) for c in p.contracts)


def partition(name: str) -> tuple[str | None, ...]:
    """The float parameter's PartitionSpec axes over a ("data", "model") mesh (whole shape)."""
    p = BY_NAME[name]
    return (None,) * p.stacked + tuple("model" if c == p.split else None for c in p.letters)


def matmul_names(cfg: LlamaConfig) -> list[str]:
    """The parameters that are matmul weights (what quantization and the kernels convert)."""
    return [p.name for p in TABLE if p.contracts and present(p, cfg)]


def variable(model, name: str):
    """The `nnx.Param` of a `Llama` at a table name ("blocks/wqkv" -> model.blocks.wqkv)."""
    for part in name.split("/"):
        model = getattr(model, part)
    return model


@dataclasses.dataclass(frozen=True)
class Spec:
    """One parameter of a config: `shape` is its float layout per layer, `contracted` the axes
    its matmul contracts (counted from the end; empty for vectors), `sources` the canonical
    file tensor names (per layer for stacked ones) whose rows make its output rows."""

    name: str
    shape: tuple[int, ...]
    contracted: tuple[int, ...]
    stacked: bool
    sources: tuple[str, ...]

    @property
    def matmul(self) -> bool:
        return bool(self.contracted)

    def split(self) -> tuple[list[int], list[int]]:
        """(kept, contracted) axes of the per-layer shape."""
        n = len(self.shape)
        c = [n + a for a in self.contracted]
        return [i for i in range(n) if i not in c], c

    @property
    def rows(self) -> int:  # N: output rows
        kept, _ = self.split()
        return math.prod(self.shape[i] for i in kept)

    @property
    def inputs(self) -> int:  # K: contracted inputs per row
        _, c = self.split()
        return math.prod(self.shape[i] for i in c)


def specs(cfg: LlamaConfig) -> dict[str, Spec]:
    """Every parameter of `Llama(cfg)` with its layout and file tensors."""
    n = sizes(cfg)
    out = {}
    for p in TABLE:
        if present(p, cfg):
            contracted = tuple(p.letters.index(c) - len(p.letters) for c in p.contracts)
            shape = tuple(n[c] for c in p.letters)
            out[p.name] = Spec(p.name, shape, contracted, p.stacked, p.sources)
    return out

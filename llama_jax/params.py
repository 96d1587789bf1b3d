"""The model's parameters as the loader builds them, one file tensor at a time.

The parameter table (`layout.specs`) says, for each parameter of `model.py`: its float layout,
the axes its matmul contracts, whether it is stacked over layers, and which file tensors it is
made of (a fused weight's rows come from several: `wqkv` from q, k and v). Every matmul weight is a set of
output rows (the file's `[out, in]` rows, reordered), so each tensor arrives as rows, becomes
rows of its parameter's format (float, int8 per channel, or 4- or 8-bit groups of 32), and once a
layer's rows are all there they go straight into the final storage of that format (the CPU
kernels' packed layout when they serve it). No whole-model float32 copy ever exists: peak
memory is the final weights plus one layer's rows of one parameter.

`Assembler` does this; `weights.load_model` feeds it from a GGUF file or safetensors shards.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from llama_jax import cpu_kernels
from llama_jax.config import LlamaConfig, rope_frequencies
from llama_jax.errors import ModelLoadError
from llama_jax.layout import Spec, specs
from llama_jax.quantize import (
    GROUP,
    Int8Weight,
    Q4Rows,
    Q4Weight,
    Q8Rows,
    Q8Weight,
    as_int4,
    int4_codes,
    q4_from_rows,
    q4_to_rows,
    q8_from_rows,
    q8_to_rows,
)

FLOAT, INT8, Q4, Q8 = "float", "int8", "q4", "q8"
GROUPED = (Q4, Q8)  # formats in groups of 32 inputs


_LAYER = "model.layers.{}."


def _source_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    D, K, N, H, F = cfg.dim, cfg.n_kv_heads, cfg.n_heads, cfg.head_dim, cfg.ffn_dim
    return {
        "model.embed_tokens.weight": (cfg.vocab_size, D),
        "lm_head.weight": (cfg.vocab_size, D),
        "model.norm.weight": (D,),
        "input_layernorm.weight": (D,),
        "post_attention_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (N * H, D),
        "self_attn.k_proj.weight": (K * H, D),
        "self_attn.v_proj.weight": (K * H, D),
        "self_attn.o_proj.weight": (D, N * H),
        "self_attn.q_proj.bias": (N * H,),
        "self_attn.k_proj.bias": (K * H,),
        "self_attn.v_proj.bias": (K * H,),
        "mlp.gate_proj.weight": (F, D),
        "mlp.up_proj.weight": (F, D),
        "mlp.down_proj.weight": (D, F),
        "rope_freqs": (H // 2,),
    }


def _destination(cfg: LlamaConfig, sub: str) -> np.ndarray | slice:
    """Where a source tensor's rows go among its parameter's output rows."""
    K, G, H, F = cfg.n_kv_heads, cfg.group, cfg.head_dim, cfg.ffn_dim
    x = np.arange(K * (G + 2) * H).reshape(K, G + 2, H)  # wqkv's output rows (k, x, h)
    if sub.startswith("self_attn.q_proj"):
        return x[:, :G].reshape(-1)
    if sub.startswith("self_attn.k_proj"):
        return x[:, G].reshape(-1)
    if sub.startswith("self_attn.v_proj"):
        return x[:, G + 1].reshape(-1)
    if sub == "mlp.gate_proj.weight":
        return slice(0, F)
    if sub == "mlp.up_proj.weight":
        return slice(F, 2 * F)
    return slice(None)


def split_name(name: str) -> tuple[str, int | None]:
    """A canonical tensor name -> (its name within a layer, the layer; None for global ones)."""
    if name.startswith("model.layers."):
        _, _, idx, sub = name.split(".", 3)
        return sub, int(idx)
    return name, None


def required_tensors(cfg: LlamaConfig) -> list[str]:
    """Canonical names of every tensor the model needs."""
    out = []
    for spec in specs(cfg).values():
        for sub in spec.sources:
            out += [_LAYER.format(i) + sub for i in range(cfg.n_layers)] if spec.stacked else [sub]
    return out


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized array on a 64-byte boundary: `jax.device_put` on CPU then uses its
    memory in place instead of copying it (a copy would double the peak while loading)."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    buf = np.empty(n + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    return buf[off : off + n].view(dtype).reshape(shape)


# -- rows of each format ---------------------------------------------------------------------


def int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float rows [n, K] -> (int8 [n, K], float32 scale [n]): symmetric, per row (channel)."""
    w = np.asarray(w, np.float32)
    amax = np.max(np.abs(w), axis=-1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    return np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8), scale


def float_rows(rows) -> np.ndarray:
    if isinstance(rows, Q4Rows):
        return q4_to_rows(*rows)
    return q8_to_rows(*rows) if isinstance(rows, Q8Rows) else rows


def convert_rows(rows, fmt: str, dtype) -> object:
    """A source tensor's rows (float [n, K], `Q4Rows` or `Q8Rows`) in format `fmt`."""
    if fmt == Q4:
        return rows if isinstance(rows, Q4Rows) else Q4Rows(*q4_from_rows(float_rows(rows)))
    if fmt == Q8:
        return rows if isinstance(rows, Q8Rows) else Q8Rows(*q8_from_rows(float_rows(rows)))
    w = float_rows(rows)
    if fmt == INT8:
        return int8_rows(w)
    return np.asarray(w).astype(dtype, copy=False)


class _Rows:
    """One layer of one parameter, in its format, filled by its source tensors."""

    def __init__(self, spec: Spec, fmt: str, dtype):
        N, K = spec.rows, spec.inputs
        self.pending = set(spec.sources)
        if not spec.matmul:
            self.parts: tuple = (np.empty((N,), dtype),)
        elif fmt == FLOAT:
            self.parts = (np.empty((N, K), dtype),)
        elif fmt == INT8:
            self.parts = (np.empty((N, K), np.int8), np.empty((N,), np.float32))
        elif fmt == Q8:
            self.parts = (np.empty((N, K), np.int8), np.empty((N, K // GROUP), np.float16))
        else:
            self.parts = (
                np.empty((N, K // 2), np.uint8),
                np.empty((N, K // GROUP), np.float16),
                np.empty((N, K // GROUP), np.float16),
            )

    def put(self, where, converted) -> None:
        parts = converted if isinstance(converted, tuple) else (converted,)
        for dst, src in zip(self.parts, parts, strict=True):
            dst[where] = src


class _Param:
    """The final storage of one parameter, filled layer by layer."""

    def __init__(self, spec: Spec, fmt: str, dtype, layers: int, packed: bool):
        self.spec, self.fmt, self.dtype, self.packed = spec, fmt, dtype, packed
        lead = (layers,) if spec.stacked else ()
        N, K = spec.rows, spec.inputs
        kept, c = spec.split()
        self.kept_shape = tuple(spec.shape[i] for i in kept)
        self.csizes = tuple(spec.shape[i] for i in c)
        T = cpu_kernels.TILE
        if not spec.matmul:
            self.store = (aligned_empty(lead + spec.shape, dtype),)
        elif fmt == FLOAT:
            shape = (N // T, K, T) if packed else spec.shape
            self.store = (aligned_empty(lead + shape, dtype),)
        elif fmt == INT8:
            if packed:
                self.store = (
                    aligned_empty(lead + (N // T, K, T), np.int8),
                    aligned_empty(lead + (N,), np.float32),
                )
            else:
                scale_shape = tuple(1 if i in c else d for i, d in enumerate(spec.shape))
                self.store = (
                    aligned_empty(lead + self.kept_shape + self.csizes, np.int8),
                    aligned_empty(lead + scale_shape, np.float32),
                )
        elif fmt == Q8:
            G = K // GROUP
            codes = (N // T, G, 256) if packed else self.kept_shape + (K,)
            scales = (N // T, G, T) if packed else self.kept_shape + (G,)
            self.store = (aligned_empty(lead + codes, np.int8), aligned_empty(lead + scales, np.float16))
        else:
            G = K // GROUP
            if packed:  # the mins only once a layer is not symmetric (`write`)
                self.store = (
                    aligned_empty(lead + (N // T, G, 128), np.uint8),
                    aligned_empty(lead + (N // T, G, T), np.float16),
                )
            else:
                self.store = (
                    aligned_empty(lead + self.kept_shape + (K // 2,), np.uint8),
                    aligned_empty(lead + self.kept_shape + (G,), np.float16),
                    aligned_empty(lead + self.kept_shape + (G,), np.float16),
                )

    def write(self, layer: int | None, rows: _Rows) -> None:
        """A complete layer's rows -> this parameter's storage."""
        spec = self.spec
        idx = (layer,) if spec.stacked else ()
        if not spec.matmul:
            self.store[0][idx] = rows.parts[0].reshape(spec.shape)
            return
        kept, c = spec.split()
        if self.fmt == FLOAT:
            (w,) = rows.parts
            if self.packed:
                self.store[0][idx] = cpu_kernels.pack(w)
            else:
                self.store[0][idx] = np.transpose(
                    w.reshape(self.kept_shape + self.csizes), np.argsort(kept + c)
                )
        elif self.fmt == INT8:
            q, scale = rows.parts
            if self.packed:
                self.store[0][idx] = cpu_kernels.pack(q)
                self.store[1][idx] = scale
            else:
                self.store[0][idx] = q.reshape(self.kept_shape + self.csizes)
                self.store[1][idx] = scale.reshape(self.store[1].shape[len(idx) :])
        elif self.fmt == Q8:
            q, scale = rows.parts
            if self.packed:
                self.store[0][idx], self.store[1][idx] = cpu_kernels.pack_q8(q, scale)
            else:
                for dst, src in zip(self.store, (q, scale), strict=True):
                    dst[idx] = src.reshape(self.kept_shape + src.shape[-1:])
        else:
            q, scale, mn = rows.parts
            if self.packed:
                data, scale, mn = cpu_kernels.pack_q4(q, scale, mn)
                self.store[0][idx], self.store[1][idx] = data, scale
                if len(self.store) == 2 and not cpu_kernels.symmetric(scale, mn):
                    # Q4_0 rows so far (every min -8 * its scale, not stored); these are not
                    self.store += (aligned_empty(self.store[1].shape, np.float16),)
                    with np.errstate(all="ignore"):  # layers not yet written hold garbage
                        self.store[2][...] = self.store[1] * np.float16(-8)
                if len(self.store) == 3:
                    self.store[2][idx] = mn
            else:
                for dst, src in zip(self.store, (q, scale, mn), strict=True):
                    dst[idx] = src.reshape(self.kept_shape + src.shape[-1:])

    def value(self, put: Callable):
        """The parameter's value for the model: an array or a weight type, its arrays placed by
        `put` (host -> device)."""
        spec = self.spec
        rel = spec.contracted
        if not spec.matmul or (self.fmt == FLOAT and not self.packed):
            return put(self.store[0])
        if self.packed:
            data, *rest = (put(a) for a in self.store)
            scale = rest[0] if rest else None
            mins = rest[1] if len(rest) > 1 else None
            return cpu_kernels.PackedWeight(
                data, scale, spec.shape, rel, mins=mins, split=cpu_kernels.q4_split()
            )
        if self.fmt == INT8:  # placed whole: a mesh splits q and scale as the float weight (sharding.placer)
            return put(Int8Weight(self.store[0], self.store[1], rel))
        if self.fmt == Q8:
            return Q8Weight(*(put(a) for a in self.store), rel, self.csizes)
        w = Q4Weight(*(put(a) for a in self.store), rel, self.csizes)
        return as_int4(w) if int4_codes() else w


def packable(spec: Spec) -> bool:
    """Whether the CPU kernels can hold this parameter (4-bit ones have whole groups already:
    `Assembler` makes any other int8)."""
    return spec.matmul and cpu_kernels.packable(spec.rows, spec.inputs)


class Assembler:
    """Builds the model's parameters from source tensors given one at a time (`add`), each
    parameter in its format (`formats`: name -> FLOAT/INT8/Q4; vectors are always float),
    packed for the CPU kernels where `kernels` and the shape allow. `finish(put)` returns the
    pure state dict (parameter path -> value) and checks that nothing is missing."""

    def __init__(self, cfg: LlamaConfig, path: object, formats: dict[str, str], dtype, kernels: bool):
        self.cfg, self.path = cfg, path
        self.specs = specs(cfg)
        self.dtype = dtype
        self.formats = {n: (formats.get(n, FLOAT) if s.matmul else FLOAT) for n, s in self.specs.items()}
        for name, spec in self.specs.items():
            if self.formats[name] in GROUPED and spec.inputs % GROUP:
                self.formats[name] = INT8  # groups need inputs in multiples of 32
        self.params = {
            n: _Param(s, self.formats[n], dtype, cfg.n_layers, kernels and packable(s))
            for n, s in self.specs.items()
        }
        self.by_source = {sub: s for s in self.specs.values() for sub in s.sources}
        self.shapes = _source_shapes(cfg)
        self.pending: dict[tuple[str, int | None], _Rows] = {}
        self.seen: set[str] = set()
        self.rope_freqs: np.ndarray | None = None

    def add(self, name: str, rows) -> None:
        """One source tensor: float rows (any float dtype), `Q4Rows` or `Q8Rows`, `[out, in]` order."""
        cfg, path = self.cfg, self.path
        sub, layer = split_name(name)
        if layer is not None and layer >= cfg.n_layers:
            raise ModelLoadError(
                path, f"tensor {name!r} is for layer {layer}, but the model has {cfg.n_layers} layers"
            )
        want = self.shapes.get(sub)
        if want is None:
            return
        if sub.endswith("_proj.bias") and not cfg.qkv_bias:
            raise ModelLoadError(path, f"tensor {name!r} is a bias, but the model config has no q/k/v biases")
        shape = rows.shape if isinstance(rows, (Q4Rows, Q8Rows)) else tuple(np.shape(rows))
        if tuple(shape) != want:
            raise ModelLoadError(path, f"tensor {name!r} has shape {tuple(shape)}, expected {want}")
        if name in self.seen:
            raise ModelLoadError(path, f"tensor {name!r} appears twice")
        self.seen.add(name)
        if sub == "rope_freqs":
            self.rope_freqs = np.asarray(float_rows(rows), np.float32)
            return
        spec = self.by_source.get(sub)
        if spec is None or (sub == "lm_head.weight" and cfg.tie_embeddings):
            return
        if spec.stacked != (layer is not None):
            raise ModelLoadError(path, f"tensor {name!r} is not where the model expects it")
        key = (spec.name, layer)
        buf = self.pending.get(key)
        if buf is None:
            buf = self.pending[key] = _Rows(spec, self.formats[spec.name], self.dtype)
        fmt = self.formats[spec.name] if spec.matmul else FLOAT
        buf.put(_destination(cfg, sub), convert_rows(rows, fmt, self.dtype))
        buf.pending.discard(sub)
        if not buf.pending:
            self.params[spec.name].write(layer, buf)
            del self.pending[key]

    def finish(self, put: Callable | None = None) -> dict:
        missing = [r for r in required_tensors(self.cfg) if r not in self.seen]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ModelLoadError(self.path, f"missing tensor {missing[0]!r}{more}")
        put = put or (lambda name, x: x)
        state: dict = {"blocks": {}}
        for name, param in self.params.items():
            value = param.value(lambda x, name=name: put(name, x))
            if "/" in name:
                state["blocks"][name.split("/", 1)[1]] = value
            else:
                state[name] = value
        inv_freq = np.asarray(rope_frequencies(self.cfg), np.float32)
        if self.rope_freqs is not None:  # llama3-style scaling shipped as per-frequency divisors (GGUF)
            inv_freq = inv_freq / self.rope_freqs
        state["inv_freq"] = put("inv_freq", inv_freq)
        return state

    def describe(self) -> str:
        """What each parameter became, for the load log."""
        parts = []
        for name, p in self.params.items():
            if p.spec.matmul:
                kind = {FLOAT: np.dtype(self.dtype).name, INT8: "int8", Q4: "4-bit", Q8: "8-bit groups"}[
                    p.fmt
                ]
                parts.append(f"{name.rsplit('/', 1)[-1]} {kind}{' packed' if p.packed else ''}")
        return ", ".join(parts)

    def nbytes(self) -> int:
        return sum(a.nbytes for p in self.params.values() for a in p.store)

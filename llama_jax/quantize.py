"""int8 weight-only quantization with per-output-channel scales.

`Int8Weight(q, scale, contracted)` replaces a float weight: `scale` is float32 with the weight's
shape, its contracted (input) axes kept as size 1, so `dequantize()` = `q * scale` is the float
weight. `q` is int8 stored output-major: the weight's kept axes first, then its contracted
axes (`contracted`, counted from the end so a per-layer slice of a stacked weight keeps them).
Every matmul is then `[rows, K] x [N, K]^T`, whose int8 operand is read row by row.

`model.dense` calls its `einsum`, which picks the formulation by static shape (the number of
activation rows, the size of the weight), because XLA:CPU picks very different kernels by
shape (the old `einsum(x, q.astype(float))` materialized a float copy of every weight, and of
the whole 49152 x 576 head, each step: int8 decode was slower than float32):

- up to 32 rows (decode), each activation row is split into two int8 parts (`x ~ s*(hi + lo/254)`) and
  one int8 x int8 dot with int32 accumulation computes both (`int8x2`). The split keeps about
  16 bits of each activation, so results differ from exact int8-weight math only by rounding
  (one int8 part alone moved the real model's top-1 token at 31% of positions);
- one activation row against a large weight (the output head at decode batch 1): a vector x
  matrix product that XLA fuses with the int8->float convert into one loop over `q`;
- many rows (prefill chunks, compute-bound): the weight converted to float and a float dot.

The embedding is quantized per row (per vocabulary entry), which serves both the lookup and the
tied output head. `quantize_model` transforms a loaded `Llama` in place, so the model code has no
int8 flags.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.model import Llama

# Parameter -> the axes its einsum contracts (per-channel scales reduce over these).
CONTRACTED = {
    "wqkv": (1,),  # [L, D, K, X, H]
    "wo": (1, 2, 3),  # [L, K, G, H, D]
    "w_gate_up": (1,),  # [L, D, 2, F]
    "w_down": (1,),  # [L, F, D]
    "embed": (1,),  # [V, D]: per row
    "lm_head": (1,),  # [V, D]: per row
}
QUANTIZATIONS = ("int8",)

# The int8 matmul formulation, read at trace time: "auto" picks by shape (below); "vector",
# "int8x2" or "float" force one for every shape (tests and benchmarks compare them).
MATMUL = "auto"
# "auto" uses the fused vector loop only for one activation row and a weight of at least this
# many elements (the output head). Measured on 2 Zen 4 cores, SmolLM2-135M decode: the head
# 4.5 ms as a vector loop, 8.4 ms as int8x2, 9.4 ms in float32; inside the layer scan the
# vector loop was slower than int8x2 (12-14 vs 17-18 tok/s for the whole step).
VECTOR_MIN_SIZE = 1 << 24
# Above this many rows (prefill chunks), int8x2's doubled int8 dot is no faster than converting
# the weight and a float dot ("float"); measured equal at 32 rows, int8x2 1.25x faster at 16.
INT8X2_MAX_ROWS = 32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8Weight:
    q: jax.Array  # int8: the weight's kept axes, then its contracted axes
    scale: jax.Array  # float32, the weight's shape with the contracted axes of size 1
    contracted: tuple[int, ...] = dataclasses.field(default=(-1,), metadata=dict(static=True))

    def _axes(self) -> tuple[list[int], list[int]]:
        """(kept, contracted) axes of the float weight, in the order `q` stores them."""
        n = self.scale.ndim
        c = [n + a for a in self.contracted]
        return [i for i in range(n) if i not in c], c

    @property
    def shape(self) -> tuple[int, ...]:
        kept, c = self._axes()
        dims = dict(zip(kept + c, self.q.shape, strict=True))
        return tuple(dims[i] for i in range(self.scale.ndim))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        kept, c = self._axes()
        q = jnp.transpose(self.q, np.argsort(kept + c))
        return q.astype(dtype) * self.scale.astype(dtype)

    def einsum(self, spec: str, x: jax.Array) -> jax.Array:
        """`einsum(spec, x, w)`. The fast path needs the contracted axes trailing in x (in the
        weight's order) and the output to be x's other axes then the weight's kept axes (true
        of every spec in `model.py`); any other spec dequantizes."""
        kept, c = self._axes()
        view = matmul_view(spec, x, kept, c)
        if view is None:
            return jnp.einsum(spec, x, self.dequantize(x.dtype))
        x2, free_shape = view
        kept_shape = self.q.shape[: len(kept)]
        n = math.prod(kept_shape)
        y = int8_matmul(x2, self.q.reshape(n, x2.shape[1]))
        y = y * self.scale.reshape(n).astype(y.dtype)
        return y.reshape(free_shape + kept_shape)

    def take_rows(self, ids: jax.Array) -> jax.Array:
        """Rows of a weight whose first axis is kept (the embedding)."""
        assert 0 not in self._axes()[1]
        return jnp.take(self.q, ids, axis=0).astype(jnp.float32) * jnp.take(self.scale, ids, axis=0)


def matmul_view(spec: str, x: jax.Array, kept: list[int], contracted: list[int]):
    """For `einsum(spec, x, w)` with a weight whose axes `kept` are outputs and `contracted`
    inputs (stored output-major, in that order): (x as [rows, K], x's free axes' shape), or None
    when the spec is not `x[free..., contracted...] -> [free..., kept...]`."""
    inputs, out = spec.split("->")
    x_sub, w_sub = inputs.split(",")
    if "..." in x_sub:
        free = [c for c in string.ascii_lowercase if c not in spec][: x.ndim - len(x_sub) + 3]
        x_sub, out = x_sub.replace("...", "".join(free)), out.replace("...", "".join(free))
    kept_sub, c_sub = "".join(w_sub[i] for i in kept), "".join(w_sub[i] for i in contracted)
    n_free = x.ndim - len(c_sub)
    if not (x_sub.endswith(c_sub) and out == x_sub[:n_free] + kept_sub):
        return None
    free_shape = x.shape[:n_free]
    x2 = x.reshape(math.prod(free_shape), math.prod(x.shape[n_free:]))
    return x2, free_shape


def int8_matmul(x: jax.Array, q: jax.Array, how: str | None = None) -> jax.Array:
    """`x @ q.T` for x [R, K] float and q [N, K] int8 (the per-channel scale is the caller's),
    formulated by R (static) and the size of q; `how` forces one formulation."""
    how = how or MATMUL
    if how == "auto":
        R = x.shape[0]
        how = (
            "vector"
            if R == 1 and q.size >= VECTOR_MIN_SIZE
            else "int8x2"
            if R <= INT8X2_MAX_ROWS
            else "float"
        )
    if how == "vector":
        # A [K] x [K, N] product with a transposed operand is what XLA:CPU fuses with the
        # convert into one loop over q (an einsum contracting q's last axis is not fused).
        qt = q.astype(x.dtype).T
        return jnp.stack([x[r] @ qt for r in range(x.shape[0])])
    if how == "int8x2":
        x32 = x.astype(jnp.float32)
        s_hi = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / 127.0
        s_hi = jnp.where(s_hi > 0, s_hi, 1.0)
        hi = jnp.round(x32 / s_hi)
        s_lo = s_hi / 254.0  # |x - hi*s_hi| <= s_hi/2, so lo fits in [-127, 127]
        lo = jnp.round((x32 - hi * s_hi) / s_lo)
        xq = jnp.concatenate([hi, lo]).astype(jnp.int8)  # [2R, K]: one dot for both parts
        acc = jax.lax.dot_general(xq, q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
        acc = acc.astype(jnp.float32)
        R = x.shape[0]
        return (acc[:R] * s_hi + acc[R:] * s_lo).astype(x.dtype)
    if how == "float":
        return jax.lax.dot_general(x, q.astype(x.dtype), (((1,), (1,)), ((), ())))
    raise ValueError(f"unknown int8 matmul formulation {how!r}")


def quantize_array(w: np.ndarray | jax.Array, axes: tuple[int, ...], on_host: bool = False) -> Int8Weight:
    """Symmetric per-channel int8: scale = max|w| over `axes` / 127; `q` stored output-major.
    `on_host`: keep numpy arrays (for a mesh to place shard by shard)."""
    w = np.asarray(w, np.float32)
    amax = np.max(np.abs(w), axis=axes, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    axes = tuple(sorted(a % w.ndim for a in axes))
    kept = [i for i in range(w.ndim) if i not in axes]
    q = np.ascontiguousarray(np.transpose(q, kept + list(axes)))
    contracted = tuple(a - w.ndim for a in axes)
    if on_host:
        return Int8Weight(q, scale, contracted)
    return Int8Weight(jnp.asarray(q), jnp.asarray(scale), contracted)


def quantize_model(model: Llama, method: str = "int8", place: Callable | None = None) -> Llama:
    """Replace the matmul weights and the embedding of `model` by int8 weights, in place.
    `place(name, weight)` puts each (host) int8 weight on devices, e.g. a mesh's
    `sharding.placer`, which splits `q` and `scale` as the float weight was."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {method!r}")
    targets = [(model.blocks, name) for name in ("wqkv", "wo", "w_gate_up", "w_down")]
    targets += [(model, "embed")] + ([(model, "lm_head")] if model.lm_head is not None else [])
    for owner, name in targets:
        var: nnx.Param = getattr(owner, name)
        w = quantize_array(var.get_value(), CONTRACTED[name], on_host=place is not None)
        var.set_value(w if place is None else place(("blocks/" if owner is model.blocks else "") + name, w))
    return model

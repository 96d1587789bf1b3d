"""Quantized weights on XLA's own ops: int8 per channel, and 8-bit and 4-bit groups of 32.

Three `Weight`s (`weight.py`) replace a float weight, each computing its own `einsum` and
`take_rows`: `Int8Weight` (int8 codes, a float32 scale per output channel), `Q8Weight` (int8
codes, a float16 scale per group of 32 inputs: Q8_0, and what Q5_x/Q6_K files become) and
`Q4Weight` (4-bit codes two to a byte, a float16 scale and min per group of 32: Q4_0/Q4_1/Q4_K;
`jnp.uint4` on GPU/TPU). Groupwise weights dequantize inside the jit; `cpu_kernels.py` packs the
same codes for its own kernels. The `*_from_rows`/`*_to_rows` pairs convert to and from the
loader's row form.

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
import os
import string
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import layout

if TYPE_CHECKING:
    from llama_jax.model import Llama

QUANTIZATIONS = ("int8", "q4", "q8")
GROUP = 32  # inputs per group of a 4- or 8-bit weight (llama.cpp's Q4_0/Q4_1/Q8_0 blocks, Q4_K's sub-blocks)

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


class _Groups:
    """What the groupwise weights (`Q4Weight`, `Q8Weight`) share: codes stored output-major,
    [kept..., K codes] with float16 scales [kept..., K/32], K the product of the contracted axes
    (`contracted`, their sizes `csizes`); `rows` dequantizes them output-major."""

    def _axes(self) -> tuple[list[int], list[int]]:
        n = self.q.ndim - 1 + len(self.csizes)
        c = [n + a for a in self.contracted]
        return [i for i in range(n) if i not in c], c

    @property
    def shape(self) -> tuple[int, ...]:
        kept, c = self._axes()
        dims = dict(zip(kept + c, (*self.q.shape[:-1], *self.csizes), strict=True))
        return tuple(dims[i] for i in range(len(dims)))

    def rows(self, dtype=jnp.float32) -> jax.Array:  # [kept..., K] in `dtype`
        raise NotImplementedError

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        kept, c = self._axes()
        w = self.rows(dtype).reshape(tuple(self.shape[i] for i in kept + c))
        return jnp.transpose(w, np.argsort(kept + c))

    def einsum(self, spec: str, x: jax.Array) -> jax.Array:
        return jnp.einsum(spec, x, self.dequantize(x.dtype))

    def take_rows(self, ids: jax.Array) -> jax.Array:
        """Rows of a weight whose first axis is kept (the embedding)."""
        assert 0 not in self._axes()[1]
        return jax.tree.map(lambda a: jnp.take(a, ids, axis=0), self).rows(jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Q4Weight(_Groups):
    """4-bit codes in groups of 32 inputs, each group with a float16 scale and min:
    w = scale * q + min, q in 0..15 (llama.cpp's Q4_0 is min = -8 * scale, Q4_1 and Q4_K's
    sub-blocks are this exactly). Stored output-major like `Int8Weight`: `q` uint8
    [kept..., K/2], where each group's 16 bytes hold its inputs j (low nibble) and j + 16 (high
    nibble), GGML's own order; `scale`, `min` float16 [kept..., K/32]; K is the product of the
    contracted axes, `shape` the float weight's shape.

    On the XLA path (GPU, TPU, a mesh, or no CPU kernels) a step dequantizes inside the jit;
    on CPU, `cpu_kernels.pack_q4` repacks it for the 4-bit kernel."""

    q: jax.Array
    scale: jax.Array
    min: jax.Array
    contracted: tuple[int, ...] = dataclasses.field(default=(-1,), metadata=dict(static=True))
    csizes: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))  # their sizes

    def rows(self, dtype=jnp.float32) -> jax.Array:
        if self.q.dtype == jnp.uint4:  # `as_int4`: one code per element
            codes = self.q.reshape(*self.q.shape[:-1], -1, GROUP)
        else:
            codes = unpack_nibbles(self.q)  # [..., K/32, 32]
        w = codes.astype(dtype) * self.scale.astype(dtype)[..., None] + self.min.astype(dtype)[..., None]
        return w.reshape(*w.shape[:-2], -1)


def int4_codes() -> bool:
    """Whether 4-bit weights on the XLA path hold their codes as `jnp.uint4` (`as_int4`): on
    GPU and TPU, where XLA reads 4-bit operands natively and fuses their convert into the dot;
    not on CPU, whose XLA path unpacks bytes (LLAMA_JAX_INT4=1/0 overrides, for tests)."""
    value = os.environ.get("LLAMA_JAX_INT4", "")
    if value:
        return value.lower() not in ("0", "false", "no", "off")
    return jax.default_backend() in ("gpu", "tpu")


def as_int4(w: Q4Weight) -> Q4Weight:
    """`w` with its codes as `jnp.uint4` [kept..., K] (unpacked on its device, in one jit)."""
    return dataclasses.replace(w, q=_unpack_uint4(w.q))


@jax.jit
def _unpack_uint4(q: jax.Array) -> jax.Array:
    codes = unpack_nibbles(q)
    return codes.reshape(*codes.shape[:-2], -1).astype(jnp.uint4)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Q8Weight(_Groups):
    """Signed 8-bit codes in groups of 32 inputs, each group with a float16 scale: w = scale * q
    (llama.cpp's Q8_0 exactly; Q5_x and Q6_K files load as this, never fewer bits than the
    file). `q` int8 [kept..., K], `scale` float16 [kept..., K/32], stored as `Q4Weight`.
    Dequantized inside the jit on the XLA path; `cpu_kernels.pack_q8` repacks it for the
    8-bit kernel."""

    q: jax.Array
    scale: jax.Array
    contracted: tuple[int, ...] = dataclasses.field(default=(-1,), metadata=dict(static=True))
    csizes: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))

    def rows(self, dtype=jnp.float32) -> jax.Array:
        codes = self.q.reshape(*self.q.shape[:-1], -1, GROUP)
        w = codes.astype(dtype) * self.scale.astype(dtype)[..., None]
        return w.reshape(*w.shape[:-2], -1)


class Q4Rows(NamedTuple):
    """4-bit rows on the host, as a file's Q4 tensor arrives: q uint8 [n, K/2] (`Q4Weight`'s
    group order), scale and min float16 [n, K/32]."""

    q: np.ndarray
    scale: np.ndarray
    min: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:  # the float rows' shape
        return (self.q.shape[0], self.q.shape[1] * 2)


def unpack_nibbles(q):
    """uint8 [..., K/2] in groups of 16 bytes -> codes [..., K/32, 32] (jax or numpy): byte j of a
    group holds input j in its low nibble and input j + 16 in its high one."""
    xp = jnp if isinstance(q, jax.Array) else np
    g = q.reshape(*q.shape[:-1], q.shape[-1] // 16, 16)
    return xp.concatenate([g & 0x0F, g >> 4], axis=-1)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """The inverse of `unpack_nibbles`: codes [..., K/32, 32] in 0..15 -> uint8 [..., K/2]."""
    c = codes.astype(np.uint8)
    packed = c[..., :16] | (c[..., 16:] << 4)
    return packed.reshape(*packed.shape[:-2], -1)


def q4_from_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float rows [..., K] (K a multiple of 32) -> (q [..., K/2], scale, min [..., K/32] float16),
    asymmetric per group (llama.cpp's Q4_1): min and max of each group map to codes 0 and 15."""
    w = np.asarray(w, np.float32)
    g = w.reshape(*w.shape[:-1], w.shape[-1] // GROUP, GROUP)
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    scale = ((hi - lo) / 15.0).astype(np.float16)
    mn = lo.astype(np.float16)
    s32 = scale.astype(np.float32)
    inv = np.divide(1.0, s32, out=np.zeros_like(s32), where=s32 > 0)
    codes = np.clip(np.rint((g - mn.astype(np.float32)[..., None]) * inv[..., None]), 0, 15)
    return pack_nibbles(codes), scale, mn


def q4_to_rows(q: np.ndarray, scale: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Float32 rows [..., K] of 4-bit codes (numpy; the reference dequantization)."""
    codes = unpack_nibbles(np.asarray(q)).astype(np.float32)
    w = codes * np.asarray(scale, np.float32)[..., None] + np.asarray(mn, np.float32)[..., None]
    return w.reshape(*w.shape[:-2], -1)


class Q8Rows(NamedTuple):
    """8-bit rows on the host, as a file's Q8_0 tensor arrives: q int8 [n, K], scale float16
    [n, K/32] (`Q8Weight`'s layout)."""

    q: np.ndarray
    scale: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape


def q8_from_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float rows [..., K] (K a multiple of 32) -> (q int8 [..., K], scale float16 [..., K/32]),
    symmetric per group (llama.cpp's Q8_0): max |w| of each group maps to 127."""
    w = np.asarray(w, np.float32)
    g = w.reshape(*w.shape[:-1], w.shape[-1] // GROUP, GROUP)
    scale = (np.abs(g).max(axis=-1) / 127.0).astype(np.float16)
    s32 = scale.astype(np.float32)
    inv = np.divide(1.0, s32, out=np.zeros_like(s32), where=s32 > 0)
    q = np.clip(np.rint(g * inv[..., None]), -127, 127).astype(np.int8)
    return q.reshape(w.shape), scale


def q8_to_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Float32 rows [..., K] of 8-bit group codes (numpy; the reference dequantization)."""
    q = np.asarray(q, np.float32)
    g = q.reshape(*q.shape[:-1], -1, GROUP) * np.asarray(scale, np.float32)[..., None]
    return g.reshape(q.shape)


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


def quantize_q4(w: np.ndarray | jax.Array, axes: tuple[int, ...]) -> Q4Weight:
    """A float weight as a `Q4Weight` contracting `axes` (their product a multiple of 32)."""
    return _quantize_groups(w, axes, "q4")


def quantize_q8(w: np.ndarray | jax.Array, axes: tuple[int, ...]) -> Q8Weight:
    """A float weight as a `Q8Weight` contracting `axes` (their product a multiple of 32)."""
    return _quantize_groups(w, axes, "q8")


def _quantize_groups(w, axes: tuple[int, ...], method: str):
    w = np.asarray(w, np.float32)
    axes = tuple(sorted(a % w.ndim for a in axes))
    kept = [i for i in range(w.ndim) if i not in axes]
    rows = np.transpose(w, kept + list(axes)).reshape(*(w.shape[i] for i in kept), -1)
    parts = q4_from_rows(rows) if method == "q4" else q8_from_rows(rows)
    contracted = tuple(a - w.ndim for a in axes)
    csizes = tuple(w.shape[a] for a in axes)
    cls = Q4Weight if method == "q4" else Q8Weight
    return cls(*(jnp.asarray(a) for a in parts), contracted, csizes)


def quantize_model(model: Llama, method: str = "int8", place: Callable | None = None) -> Llama:
    """Replace the matmul weights and the embedding of `model` by int8 (or, `method` "q4" or
    "q8", 4- or 8-bit groupwise) weights, in place. `place(name, weight)` puts each (host) int8 weight on devices,
    e.g. a mesh's `sharding.placer`, which splits `q` and `scale` as the float weight was
    (groupwise weights are not split over a mesh)."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {method!r}")
    if method != "int8" and place is not None:
        raise ValueError("groupwise weights are not split over a mesh: use int8")
    for name in layout.matmul_names(model.cfg):
        var: nnx.Param = layout.variable(model, name)
        axes = layout.contracted_axes(name)
        if method != "int8":
            var.set_value(_quantize_groups(var.get_value(), axes, method))
            continue
        w = quantize_array(var.get_value(), axes, on_host=place is not None)
        var.set_value(w if place is None else place(name, w))
    return model

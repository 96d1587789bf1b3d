"""Hand-written CPU kernels for the decode step (`kernels/cpu_kernels.cc`), as XLA FFI calls.

On the CPU backend, a decode step's matmuls and its attention over the KV cache are where
XLA:CPU's generic emitters lose most: they read weights at a fraction of memory bandwidth,
copy the layer slice of a stacked weight or cache before using it, and sort a whole
vocabulary for top-k. The kernels here do these directly: `matmul` for float32 and int8
weights repacked in tiles of 8 output channels (`pack`, `PackedWeight`; prefill chunks too,
skipping padding rows), `attend` for one new token per row over one layer of the cache,
reading only each row's valid positions, `attend_chunk` for a prefill chunk (causal, valid
cache positions and rows only), and `top_k` for sampling.

The C++ source is compiled with the system's C++ compiler at first use (`-O3 -march=native`,
a few seconds) into a per-user cache keyed on the source, the jaxlib headers and the CPU, then
registered with XLA. Where there is no compiler, or the build fails, or
`LLAMA_JAX_CPU_KERNELS=0` is set, `available()` is false and the model keeps its pure-XLA
path: the kernels are an optimization, never a requirement.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.model import Ops

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "cpu_kernels.cc"
TARGETS = (
    "lj_matmul_f32",
    "lj_matmul_i8",
    "lj_matmul_q4",
    "lj_matmul_q8",
    "lj_attend",
    "lj_attend_f16",
    "lj_attend_chunk",
    "lj_attend_chunk_f16",
    "lj_top_k",
)


def _cache_operand(x: jax.Array) -> tuple[jax.Array, str]:
    """A cache operand as the kernels take it, and their name's suffix. (float16 goes as it is:
    a bitcast to its bits made XLA copy the whole cache every step.)"""
    if x.dtype == jnp.float16:
        return x, "_f16"
    return x.astype(jnp.float32), ""


_lock = threading.Lock()
_state: dict = {}


def _cache_dir() -> Path:
    root = os.environ.get("LLAMA_JAX_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llama-jax", "kernels"
    )
    return Path(root)


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("flags", "model name", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _build() -> Path:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    include = jax.ffi.include_dir()
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", f"-I{include}"]
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(flags).encode(), compiler.encode(), _cpu_signature().encode()):
        key.update(part)
    key.update((Path(include) / "xla" / "ffi" / "api" / "c_api.h").read_bytes())
    out = _cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        proc = subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", str(tmp_out)], capture_output=True, text=True, timeout=600
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build {SOURCE.name}:\n{proc.stderr[-4000:]}")
        os.replace(tmp_out, out)  # atomic: concurrent builders agree on the result
    return out


def available() -> bool:
    """True when the kernels are built and registered with XLA for the CPU platform."""
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _load()
        return _state["ok"]


def _load() -> bool:
    if os.environ.get("LLAMA_JAX_CPU_KERNELS", "1").lower() in ("0", "false", "no", "off"):
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        for name in TARGETS:
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    except Exception as e:  # no compiler, a failed build, an old jaxlib: the XLA path serves
        log.warning("CPU kernels unavailable, using XLA's own ops: %s", e)
        return False
    _state["lib"] = lib
    return True


TILE = 8  # output channels per tile of a packed weight


def packable(n: int, k: int) -> bool:
    return n % TILE == 0 and n > 0 and k > 0


def pack(w: np.ndarray) -> np.ndarray:
    """w [..., N, K] (output-major) -> [..., N/8, K, 8]: tile t holds channels 8t..8t+7, input
    by input, so it is one contiguous run read in order and each input's 8 weights are one
    vector."""
    *lead, N, K = w.shape
    tiles = np.asarray(w).reshape(*lead, N // TILE, TILE, K)
    return np.ascontiguousarray(np.swapaxes(tiles, -1, -2))


def unpack(p: jax.Array) -> jax.Array:
    """The inverse of `pack` ([..., N, K]), in XLA (for shapes the kernels do not serve)."""
    *lead, nt, K, _ = p.shape
    return jnp.swapaxes(p, -1, -2).reshape(*lead, nt * TILE, K)


def pack_q4(q: np.ndarray, scale: np.ndarray, mn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-bit rows (`quantize.Q4Weight`'s q [..., N, K/2], scale and min [..., N, K/32]) -> the 4-bit
    kernel's layout: codes [..., N/8, K/32, 128], scale and min [..., N/8, K/32, 8]. In a tile's
    group, byte b*32 + j*4 + i is channel j's group byte 4b+i (inputs 4b+i and 16+4b+i), so one
    32-byte load is 8 channels x 4 inputs, the operand of one integer dot instruction."""
    q = np.asarray(q)
    *lead, N, half = q.shape
    G = half // 16
    tiles = q.reshape(*lead, N // TILE, TILE, G, 4, 4)
    order = (*range(len(lead)), len(lead), len(lead) + 2, len(lead) + 3, len(lead) + 1, len(lead) + 4)
    packed = np.ascontiguousarray(tiles.transpose(order)).reshape(*lead, N // TILE, G, 4 * TILE * 4)

    def per_group(a):
        a = np.asarray(a, np.float16).reshape(*lead, N // TILE, TILE, G)
        return np.ascontiguousarray(np.swapaxes(a, -1, -2))

    return packed, per_group(scale), per_group(mn)


def pack_q8(q: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-bit group rows (`quantize.Q8Weight`'s q int8 [..., N, K], scale [..., N, K/32]) -> the
    8-bit kernel's layout: codes int8 [..., N/8, K/32, 256], scale float16 [..., N/8, K/32, 8].
    In a tile's group, byte b*32 + j*4 + i is channel j's code for input 4b+i: one 32-byte load
    is 8 channels x 4 inputs, as in `pack_q4`."""
    q = np.asarray(q, np.int8)
    *lead, N, K = q.shape
    G = K // 32
    tiles = q.reshape(*lead, N // TILE, TILE, G, 8, 4)
    n = len(lead)
    order = (*range(n), n, n + 2, n + 3, n + 1, n + 4)  # [.., t, g, b, j, i]
    packed = np.ascontiguousarray(tiles.transpose(order)).reshape(*lead, N // TILE, G, 8 * TILE * 4)
    s = np.asarray(scale, np.float16).reshape(*lead, N // TILE, TILE, G)
    return packed, np.ascontiguousarray(np.swapaxes(s, -1, -2))


SPLIT = 6.0  # `matmul_q4`'s default: the few groups of outlier channels get 16-bit activations


def q4_split() -> float:
    """`SPLIT`, or LLAMA_JAX_Q4_SPLIT (0: 16-bit activations everywhere, the most exact and at
    several rows the slowest; a large value: 8-bit everywhere, as llama.cpp's Q8 activations)."""
    value = os.environ.get("LLAMA_JAX_Q4_SPLIT", "")
    try:
        split = float(value) if value else SPLIT
    except ValueError:
        raise ValueError(f"LLAMA_JAX_Q4_SPLIT must be a number >= 0, not {value!r}") from None
    if not split >= 0:
        raise ValueError(f"LLAMA_JAX_Q4_SPLIT must be a number >= 0, not {value!r}")
    return split


def symmetric(scale: np.ndarray, mn: np.ndarray) -> bool:
    """Whether every 4-bit group's min is -8 times its scale (Q4_0's symmetric codes), exactly as
    the kernel computes it: the mins need not be stored or read."""
    return bool(np.array_equal(np.asarray(mn, np.float32), np.asarray(scale, np.float32) * -8))


def matmul_q4(x, w, scale, mn, layer=None, rows=None, split: float = SPLIT) -> jax.Array:
    """x [R, K] float32 times a `pack_q4` weight w [(L,) N/8, K/32, 128] with float16 scale and
    min [(L,) N/8, K/32, 8], transposed: [R, N] float32 (`layer`, `rows` as in `matmul`). `mn`
    None: a symmetric weight, each group's min -8 * its scale (Q4_0). The kernel quantizes x
    per group of 32 inputs to int8, with a second int8 part (~16 bits) for the groups whose
    max |x| exceeds `split` times the row's rms (0: every group), row by row: a row's result
    does not depend on the other rows."""
    R, N = x.shape[0], w.shape[-3] * TILE
    out = jax.ShapeDtypeStruct((R, N), jnp.float32)
    ctl = _ctl(layer, rows, R)
    f16 = functools.partial(jnp.asarray, dtype=jnp.float16)
    mn = jnp.zeros((0,), jnp.float16) if mn is None else f16(mn)
    return jax.ffi.ffi_call("lj_matmul_q4", out)(
        x.astype(jnp.float32), w, f16(scale), mn, ctl, split=np.float32(split)
    )


def matmul_q8(x, w, scale, layer=None, rows=None, split: float = SPLIT) -> jax.Array:
    """x [R, K] float32 times a `pack_q8` weight w [(L,) N/8, K/32, 256] with float16 scale
    [(L,) N/8, K/32, 8], transposed: [R, N] float32 (`layer`, `rows` as in `matmul`; x
    quantized as in `matmul_q4`)."""
    R, N = x.shape[0], w.shape[-3] * TILE
    out = jax.ShapeDtypeStruct((R, N), jnp.float32)
    return jax.ffi.ffi_call("lj_matmul_q8", out)(
        x.astype(jnp.float32),
        w,
        jnp.asarray(scale, jnp.float16),
        _ctl(layer, rows, R),
        split=np.float32(split),
    )


def _ctl(layer, rows, R: int) -> jax.Array:
    return jnp.stack(
        [
            jnp.asarray(0 if layer is None else layer, jnp.int32),
            jnp.asarray(R if rows is None else rows, jnp.int32),
        ]
    )


def matmul(x: jax.Array, w: jax.Array, scale: jax.Array | None = None, layer=None, rows=None) -> jax.Array:
    """x [R, K] float32 times the packed weight w [N/8, K, 8] (float32, or int8 with
    per-channel `scale` [N]), transposed: [R, N] float32. A stacked weight [L, N/8, K, 8]
    (scale [L, N]) with `layer` (a traced int32) uses that layer's slice without copying it.
    `rows` (traced): only the first `rows` rows are computed, the others are zeros (a prefill
    chunk's padding costs nothing)."""
    R, N = x.shape[0], w.shape[-3] * TILE
    out = jax.ShapeDtypeStruct((R, N), jnp.float32)
    x = x.astype(jnp.float32)
    ctl = _ctl(layer, rows, R)
    if w.dtype == jnp.int8:
        return jax.ffi.ffi_call("lj_matmul_i8", out)(x, w, scale.astype(jnp.float32), ctl)
    return jax.ffi.ffi_call("lj_matmul_f32", out)(x, w.astype(jnp.float32), ctl)


def attend(q, k_new, v_new, k_cache, v_cache, layer, lengths) -> jax.Array:
    """One new token per row over layer `layer` of the cache plus itself.

    q [B, KV, G, H]; k_new, v_new [B, KV, H]; k_cache, v_cache [L, Bmax, S, KV, H] (B <= Bmax:
    row b is slot b; float32 or float16); layer int32 scalar; lengths [B] valid cached positions.
    -> [B, KV, G, H].
    """
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    k_cache, suffix = _cache_operand(k_cache)
    v_cache, _ = _cache_operand(v_cache)
    return jax.ffi.ffi_call("lj_attend" + suffix, out)(
        q.astype(jnp.float32),
        k_new.astype(jnp.float32),
        v_new.astype(jnp.float32),
        k_cache,
        v_cache,
        jnp.asarray(layer, jnp.int32),
        lengths.astype(jnp.int32),
    )


def attend_chunk(q, k_new, v_new, k_ctx, v_ctx, start, valid) -> jax.Array:
    """A prefill chunk of one slot attending causally over the slot's cache and itself.

    q [T, KV, G, H]; k_new, v_new [T, KV, H] (the chunk's keys and values); k_ctx, v_ctx
    [C, KV, H] (float32 or float16) or None (no cache); start: valid cache positions (int32 scalar, clamped to C);
    valid: rows to compute (int32 scalar; later rows are padding, returned as zeros).
    -> [T, KV, G, H]."""
    if k_ctx is None:  # nothing cached: any [C, KV, H] operand with start 0
        k_ctx, v_ctx, start = k_new, v_new, 0
    ctl = jnp.stack([jnp.asarray(start, jnp.int32), jnp.asarray(valid, jnp.int32)])
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    k_ctx, suffix = _cache_operand(k_ctx)
    v_ctx, _ = _cache_operand(v_ctx)
    return jax.ffi.ffi_call("lj_attend_chunk" + suffix, out)(
        f32(q), f32(k_new), f32(v_new), k_ctx, v_ctx, ctl
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedWeight:
    """A matmul weight in the kernels' layout: `data` [(L,) N/8, K, 8] (`pack` of the weight
    stored output-major, N its kept axes, K its contracted ones), float32 or int8 with
    `scale` [(L,) N]; or 4-bit groups (`pack_q4`: data uint8 [(L,) N/8, K/32, 128], `scale` and
    `mins` float16 [(L,) N/8, K/32, 8]); or 8-bit groups (`pack_q8`: data int8 [(L,) N/8, K/32,
    256], `scale` float16 [(L,) N/8, K/32, 8]). `kind` says which, from the dtypes. `layer_shape` is the float weight's shape without the layer
    axis and `contracted` its contracted axes counted from the end, as in `Int8Weight`.

    Stacked on a leading layer axis, it is not sliced by the layer scan: `at_layer(layer)` gives a
    view whose `einsum` passes the whole array and the layer index to the kernel, which reads
    that layer in place (a sliced operand would be copied by XLA, every layer, every step)."""

    data: jax.Array
    scale: jax.Array | None
    layer_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    contracted: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    layer: jax.Array | None = None  # a view's layer (`at_layer`)
    rows: jax.Array | None = None  # a view's count of activation rows to compute (`at_layer`)
    mins: jax.Array | None = None  # 4-bit weights: each group's min (None: symmetric, -8 * scale)
    split: float = dataclasses.field(default=SPLIT, metadata=dict(static=True))  # 4-bit: see `matmul_q4`

    @property
    def shape(self) -> tuple[int, ...]:
        """The float weight's shape (with the layer axis when stacked)."""
        return (self.data.shape[0], *self.layer_shape) if self.data.ndim == 4 else self.layer_shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def kind(self) -> str:
        """ "q4", "q8" (groups of 32 with float16 scales), "int8" (per channel) or "float"."""
        if self.data.dtype == jnp.uint8:
            return "q4"
        if self.data.dtype == jnp.int8:
            return "q8" if self.scale.dtype == jnp.float16 else "int8"
        return "float"

    def _axes(self) -> tuple[list[int], list[int]]:
        n = len(self.layer_shape)
        c = [n + a for a in self.contracted]
        return [i for i in range(n) if i not in c], c

    def at_layer(self, layer, rows=None) -> PackedWeight:
        """A view of one layer of a stacked weight; `rows`: compute only the first `rows`
        flattened activation rows of each product (the others are zeros)."""
        return dataclasses.replace(self, layer=layer, rows=rows)

    def einsum(self, spec: str, x: jax.Array) -> jax.Array:
        """`einsum(spec, x, w)` for the specs of `model.py` (see `quantize.matmul_view`)."""
        from llama_jax.quantize import matmul_view

        kept, c = self._axes()
        view = matmul_view(spec, x, kept, c)
        if view is None:
            raise ValueError(f"a packed weight cannot serve einsum {spec!r}")
        x2, free_shape = view
        if self.kind == "q4":
            y = matmul_q4(x2, self.data, self.scale, self.mins, self.layer, self.rows, self.split)
        elif self.kind == "q8":
            y = matmul_q8(x2, self.data, self.scale, self.layer, self.rows, self.split)
        else:
            y = matmul(x2, self.data, self.scale, self.layer, self.rows)
        return y.reshape(free_shape + tuple(self.layer_shape[i] for i in kept)).astype(x.dtype)

    def take_rows(self, ids: jax.Array) -> jax.Array:
        """Rows of the (unstacked) embedding [V, D]: row v is data[v // 8, :, v % 8]."""
        if self.kind in ("q4", "q8"):
            return _group_take_rows(self, ids)
        rows = self.data[ids // TILE, :, ids % TILE].astype(jnp.float32)
        return rows if self.scale is None else rows * self.scale[ids][..., None]


def _group_take_rows(w: PackedWeight, ids: jax.Array) -> jax.Array:
    """Float32 rows [..., D] of a 4- or 8-bit packed embedding (the inverse of `pack_q4` or
    `pack_q8` for rows `ids`)."""
    t, j = ids // TILE, ids % TILE
    data = w.data[t]  # [..., G, bytes]
    G = data.shape[-2]
    data = data.reshape(*data.shape[:-1], -1, TILE, 4)  # [..., G, b, j, i]
    group = jnp.take_along_axis(data, j[..., None, None, None, None], axis=-2)[..., 0, :]  # [..., G, b, 4]
    group = group.reshape(*group.shape[:-2], -1)
    if w.kind == "q4":
        codes = jnp.concatenate([group & 0x0F, group >> 4], axis=-1).astype(jnp.float32)  # [..., G, 32]
    else:
        codes = group.astype(jnp.float32)
    scale = jnp.take_along_axis(w.scale[t], j[..., None, None], axis=-1).astype(jnp.float32)  # [..., G, 1]
    if w.kind == "q8":
        mn = 0.0
    elif w.mins is None:
        mn = -8 * scale
    else:
        mn = jnp.take_along_axis(w.mins[t], j[..., None, None], axis=-1).astype(jnp.float32)
    return (codes * scale + mn).reshape(*codes.shape[:-2], G * 32)


def pack_weight(w, contracted: tuple[int, ...], stacked: bool) -> PackedWeight | None:
    """`w` (a float array or an `Int8Weight`) in the packed layout, or None when its output
    size is not a multiple of the tile. `contracted`: the axes its matmul contracts, counting
    the layer axis of a `stacked` weight (`layout.contracted_axes`)."""
    from llama_jax.quantize import Int8Weight, Q4Weight, Q8Weight

    lead = 1 if stacked else 0
    if isinstance(w, Q8Weight):
        N = int(np.prod(w.q.shape[lead:-1]))
        if not packable(N, w.q.shape[-1]):
            return None
        K = w.q.shape[-1]
        data, scale = pack_q8(
            np.asarray(w.q).reshape(w.q.shape[:lead] + (N, K)),
            np.asarray(w.scale).reshape(w.q.shape[:lead] + (N, K // 32)),
        )
        return PackedWeight(
            jnp.asarray(data), jnp.asarray(scale), tuple(w.shape[lead:]), w.contracted, split=q4_split()
        )
    if isinstance(w, Q4Weight):
        N = int(np.prod(w.q.shape[lead:-1]))
        if not packable(N, w.q.shape[-1]):
            return None
        shape = w.shape[lead:]
        rows = w.q.shape[:lead] + (N, w.q.shape[-1])
        groups = w.q.shape[:lead] + (N, w.scale.shape[-1])
        data, scale, mn = pack_q4(
            np.asarray(w.q).reshape(rows),
            np.asarray(w.scale).reshape(groups),
            np.asarray(w.min).reshape(groups),
        )
        mins = None if symmetric(scale, mn) else jnp.asarray(mn)
        return PackedWeight(
            jnp.asarray(data), jnp.asarray(scale), tuple(shape), w.contracted, mins=mins, split=q4_split()
        )
    if isinstance(w, Int8Weight):
        q = np.asarray(w.q)  # output-major already: [L?, kept..., contracted...]
        shape = w.shape[lead:]
        rel = w.contracted
        scale = np.asarray(w.scale)
    else:
        a = np.asarray(w, np.float32)
        nd = a.ndim
        c = sorted(x % nd for x in contracted)
        kept = [i for i in range(nd) if i not in c]
        q = np.transpose(a, kept + c)
        shape = a.shape[lead:]
        rel = tuple(x - nd for x in c)
        scale = None
    n_c = len(rel)
    K = int(np.prod(q.shape[q.ndim - n_c :]))
    N = int(np.prod(q.shape[lead : q.ndim - n_c]))
    if not packable(N, K):
        return None
    q = q.reshape(q.shape[:lead] + (N, K))
    packed = jnp.asarray(pack(q))
    if scale is not None:
        scale = jnp.asarray(scale.reshape(q.shape[:lead] + (N,)), jnp.float32)
    return PackedWeight(packed, scale, tuple(shape), tuple(rel))


def pack_model(model) -> bool:
    """Put `model`'s matmul weights (float32, int8 or groupwise) in the kernels' layout, in
    place, and give it the kernels' ops (`KernelOps`). False (and nothing changed) when the
    kernels are unavailable or the model's activations are not float32."""
    from llama_jax import layout

    if jnp.dtype(model.dtype) != jnp.float32 or not available():
        return False
    for name in layout.matmul_names(model.cfg):
        var = layout.variable(model, name)
        packed = pack_weight(var.get_value(), layout.contracted_axes(name), layout.BY_NAME[name].stacked)
        if packed is not None:
            var.set_value(packed)
    model.ops = OPS
    return True


@dataclasses.dataclass(frozen=True)
class KernelOps(Ops):
    """The CPU kernels' attention and top-k (`model.Ops`): a decode step's rows attend over
    their valid cache positions read in place by layer index, one slot's prefill chunk over its
    valid positions and real rows; anything else is XLA's. Their KV cache is float16 by
    default (half the memory and bandwidth of float32, as llama.cpp's)."""

    name: str = "cpu-kernels"
    kv_dtype: str | None = "float16"

    def cache_in_place(self, x: jax.Array, view) -> bool:
        return view.k is not None and x.shape[1] == 1

    def attend(self, q, k, v, k_ctx, v_ctx, view, layer, valid):
        B, T = q.shape[:2]
        if view.k is not None and T == 1:
            return attend(q[:, 0], k[:, 0], v[:, 0], view.k, view.v, layer, view.ctx_len)[:, None]
        if B == 1 and T > 1:
            kc, vc = (None, None) if k_ctx is None else (k_ctx[0], v_ctx[0])
            return attend_chunk(q[0], k[0], v[0], kc, vc, view.ctx_len[0], T if valid is None else valid)[
                None
            ]
        return super().attend(q, k, v, k_ctx, v_ctx, view, layer, valid)

    def top_k(self, x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
        return top_k(x, k)


OPS = KernelOps()


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k` over the last axis of x [B, V] float32: (values, int32 indices) [B, k],
    descending, equal values in index order."""
    B = x.shape[0]
    out = (jax.ShapeDtypeStruct((B, k), jnp.float32), jax.ShapeDtypeStruct((B, k), jnp.int32))
    return jax.ffi.ffi_call("lj_top_k", out)(x.astype(jnp.float32))


def reference_matmul(x: np.ndarray, w: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """The same product in float64 numpy (tests)."""
    y = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    return y if scale is None else y * np.asarray(scale, np.float64).reshape(-1)

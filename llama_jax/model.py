"""The Llama-family transformer in Flax NNX, as pure functions of (weights, tokens, cache view).

Shape letters: B batch/slots, T new tokens, C cached context, L layers, D model dim, K KV heads,
G query heads per KV head (N = K*G), H head dim, F MLP dim, V vocab, X the fused q/k/v axis.

Layout choices (all for speed on XLA, see ../shared/reference/jax-serving.md):
- Layers are stacked on a leading L axis and applied with `lax.scan` (compile time flat in
  depth).
- Q, K and V are one fused weight `[L, D, K, G+2, H]`: per KV head, its G query heads, then
  its key and its value. One dot instead of three, and the K axis stays whole, so tensor
  parallelism can split it. Query head n = k*G + g uses KV head k, as in Hugging Face.
- Gate and up projections are one fused weight `[L, D, 2, F]`.
- Attention is a grouped einsum over `[B, T, K, G, H]` queries: K/V are never repeated.
- The model never writes the KV cache: it reads a cache view `[L, B, C, K, H]` (the first C
  positions, of which `ctx_len[b]` are valid) and returns this chunk's new K/V rows
  `[L, B, T, K, H]`; `cache.py` writes them. That keeps the cache out of the scan carry, so
  XLA never copies it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax import layout
from llama_jax.config import LlamaConfig, rope_frequencies
from llama_jax.weight import LayerStack, Weight


class Buffer(nnx.Variable):
    """A constant array stored with the model (not a trainable parameter): RoPE frequencies."""


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding on split halves (Hugging Face layout). x: [B, T, ..., H], positions [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attend(q, k_new, v_new, k_ctx, v_ctx, ctx_len):
    """Causal attention of a chunk over the cached context plus itself.

    q [B,T,K,G,H]; k_new, v_new [B,T,K,H]; k_ctx, v_ctx [B,C,K,H] or None; ctx_len [B].
    Returns [B,T,K,G,H].
    """
    T = q.shape[1]
    scale = q.shape[-1] ** -0.5
    neg = jnp.finfo(jnp.float32).min
    s_new = jnp.einsum("BTKGH,BSKH->BKGTS", q, k_new, preferred_element_type=jnp.float32) * scale
    s_new = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s_new, neg)
    if k_ctx is None:
        p = jax.nn.softmax(s_new, axis=-1).astype(v_new.dtype)
        return jnp.einsum("BKGTS,BSKH->BTKGH", p, v_new)
    C = k_ctx.shape[1]
    s_ctx = jnp.einsum("BTKGH,BCKH->BKGTC", q, k_ctx, preferred_element_type=jnp.float32) * scale
    valid = jnp.arange(C)[None, :] < ctx_len[:, None]  # [B, C]
    s_ctx = jnp.where(valid[:, None, None, None, :], s_ctx, neg)
    p = jax.nn.softmax(jnp.concatenate([s_ctx, s_new], axis=-1), axis=-1).astype(v_new.dtype)
    return jnp.einsum("BKGTC,BCKH->BTKGH", p[..., :C], v_ctx) + jnp.einsum(
        "BKGTS,BSKH->BTKGH", p[..., C:], v_new
    )


def dense(x: jax.Array, w, spec: str) -> jax.Array:
    """`einsum(spec, x, w)`: a `Weight` computes it its own way, a float array here."""
    if isinstance(w, Weight):
        return w.einsum(spec, x)
    return jnp.einsum(spec, x, w.astype(x.dtype))


class CacheView(NamedTuple):
    """What a chunk attends to: the KV cache `k`, `v` [L, B, C, K, H] (None: nothing cached,
    the chunk starts at position 0) of which `ctx_len` [B] positions are valid per row; with
    `context` (static) only the first `context` positions are attended to, and with `rows`
    (static) only the first `rows` slots (the slices are taken per layer inside the scan, so
    the whole-cache view is never copied)."""

    k: jax.Array | None
    v: jax.Array | None
    ctx_len: jax.Array
    context: int | None = None
    rows: int | None = None


@dataclasses.dataclass(frozen=True)
class Ops:
    """How a step attends and picks its top-k, beyond its weights' own matmuls: XLA's, on every
    backend. Chosen when the model is prepared (`Llama.ops`; the CPU kernels' subclass is
    `cpu_kernels.KernelOps`), so the model code has no backend flags. Static: part of the
    model's graph definition, so frozen and compared by value."""

    name: str = "xla"
    kv_dtype: str | None = None  # the KV cache's "auto" element type (None: the activations')

    def cache_in_place(self, x: jax.Array, view: CacheView) -> bool:
        """Whether layer `i`'s attention reads the whole cache by its index (`attend`'s
        `layer`), so the layer scan must not slice it."""
        return False

    def attend(self, q, k, v, k_ctx, v_ctx, view: CacheView, layer, valid):
        """One layer's attention: q [B,T,K,G,H]; k, v [B,T,K,H] (the chunk's own); k_ctx,
        v_ctx [B,C,K,H] (this layer's cache slice; None when nothing is cached or the cache is
        read in place); `layer` (traced) the layer index; `valid` (traced or None) the real
        rows of a padded chunk. -> [B,T,K,G,H]."""
        return attend(q, k, v, k_ctx, v_ctx, view.ctx_len)

    def top_k(self, x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
        return jax.lax.top_k(x, k)


XLA = Ops()


class Blocks(nnx.Module):
    """All L transformer blocks, weights stacked on a leading L axis."""

    def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(0.02)
        for name, spec in layout.specs(cfg).items():
            if spec.stacked:
                shape = (cfg.n_layers, *spec.shape)
                value = init(rngs.params(), shape, dtype) if spec.matmul else _vector(name, shape, dtype)
                setattr(self, name.removeprefix("blocks/"), nnx.Param(value))
        if not cfg.qkv_bias:
            self.bqkv = None

    def __call__(self, x, positions, inv_freq, view: CacheView, ops: Ops, valid=None, kv_dtype=None):
        """x [B,T,D] -> (x [B,T,D], new_k [L,B,T,K,H], new_v [L,B,T,K,H]).

        A weight that reads its layer in place (`LayerStack`: the CPU kernels' packed weights)
        stays out of the scan's sliced inputs and gets the layer index, and so does the cache
        when `ops` reads it in place. `valid` (traced): how many of the B*T token rows are
        real (a padded prefill chunk; the kernels compute only those). `kv_dtype` (static): the
        KV cache's element type; a chunk's own keys and values are rounded to it before they
        are attended to, so a position reads the same values whether it is in this chunk or in
        the cache later (a prompt prefilled whole and one continued from the prefix cache give
        the same numbers).
        """
        cfg = self.cfg
        G = cfg.group
        names = ("attn_norm", "wqkv", "bqkv", "wo", "mlp_norm", "w_gate_up", "w_down")
        weights = {n: getattr(self, n).get_value() for n in names if getattr(self, n) is not None}
        in_place = {n: w for n, w in weights.items() if isinstance(w, LayerStack)}
        scanned = {n: w for n, w in weights.items() if n not in in_place}
        layers = jnp.arange(cfg.n_layers, dtype=jnp.int32)
        cache_in_place = ops.cache_in_place(x, view)
        xs = (scanned, None, None, layers) if cache_in_place else (scanned, view.k, view.v, layers)

        def layer(x, xs):
            w, k_ctx, v_ctx, i = xs
            w = {**w, **{n: p.at_layer(i, valid) for n, p in in_place.items()}}
            if view.context is not None and k_ctx is not None:
                k_ctx, v_ctx = k_ctx[: view.rows, : view.context], v_ctx[: view.rows, : view.context]
            h = rms_norm(x, w["attn_norm"], cfg.norm_eps)
            qkv = dense(h, w["wqkv"], "BTD,DKXH->BTKXH")
            if "bqkv" in w:
                qkv = qkv + w["bqkv"].astype(qkv.dtype)
            q = rope(qkv[..., :G, :], positions, inv_freq)
            k = rope(qkv[..., G, :], positions, inv_freq)
            v = qkv[..., G + 1, :]
            if kv_dtype is not None and jnp.dtype(kv_dtype) != k.dtype:
                k, v = (a.astype(kv_dtype).astype(a.dtype) for a in (k, v))
            o = ops.attend(q, k, v, k_ctx, v_ctx, view, i, valid)
            x = x + dense(o, w["wo"], "BTKGH,KGHD->BTD")
            h = rms_norm(x, w["mlp_norm"], cfg.norm_eps)
            gu = dense(h, w["w_gate_up"], "BTD,DCF->BTCF")
            x = x + dense(jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :], w["w_down"], "BTF,FD->BTD")
            return x, (k, v)

        x, (new_k, new_v) = jax.lax.scan(layer, x, xs)
        return x, new_k, new_v


def _vector(name: str, shape, dtype) -> jax.Array:
    """A new vector parameter: norms start at one, biases at zero."""
    return (jnp.ones if name.endswith("norm") else jnp.zeros)(shape, dtype)


class Llama(nnx.Module):
    """Embedding, stacked blocks, final norm and (tied or separate) output head."""

    def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = dtype
        init = nnx.initializers.normal(0.02)
        specs = layout.specs(cfg)
        self.embed = nnx.Param(init(rngs.params(), specs["embed"].shape, dtype))
        self.blocks = Blocks(cfg, dtype, rngs)
        self.norm = nnx.Param(_vector("norm", specs["norm"].shape, dtype))
        self.lm_head = (
            nnx.Param(init(rngs.params(), specs["lm_head"].shape, dtype)) if "lm_head" in specs else None
        )
        self.inv_freq = Buffer(jnp.asarray(rope_frequencies(cfg), jnp.float32))
        self.ops = XLA  # `cpu_kernels.pack_model` (or the loader) sets the CPU kernels' ops

    @property
    def kernels(self) -> bool:
        """Whether the model runs on the CPU kernels (their ops and packed weights)."""
        return self.ops.name != XLA.name

    def hidden(
        self,
        tokens,
        positions,
        k_cache=None,
        v_cache=None,
        ctx_len=None,
        context=None,
        rows=None,
        valid=None,
        kv_dtype=None,
    ):
        """Final-norm hidden states [B,T,D] and the chunk's K/V rows [L,B,T,K,H] each.

        tokens, positions: [B,T]; k_cache, v_cache: [L,B,C,K,H] views (or None when the chunk
        starts at position 0); ctx_len [B]: valid cached positions; context (static): attend
        over only the first `context` positions of the cache views; rows (static): the batch is
        the cache views' first `rows` slots; valid (traced): how many of the B*T token rows
        are real (the rest is padding the CPU kernels skip; None: all); kv_dtype (static): the
        cache's element type, which the chunk's keys and values are rounded to.
        """
        x = embed_lookup(self.embed.get_value(), tokens).astype(self.dtype)
        if ctx_len is None:
            ctx_len = jnp.zeros(tokens.shape[:1], jnp.int32)
        view = CacheView(k_cache, v_cache, ctx_len, context, rows)
        x, new_k, new_v = self.blocks(
            x, positions, self.inv_freq.get_value(), view, self.ops, valid, kv_dtype
        )
        return rms_norm(x, self.norm.get_value(), self.cfg.norm_eps), new_k, new_v

    def logits(self, h: jax.Array) -> jax.Array:
        """h [..., D] -> float32 logits [..., V]."""
        if self.lm_head is None:
            return dense(h, self.embed.get_value(), "...D,VD->...V").astype(jnp.float32)
        return dense(h, self.lm_head.get_value(), "...D,VD->...V").astype(jnp.float32)


def embed_lookup(table, tokens: jax.Array) -> jax.Array:
    if isinstance(table, Weight):
        return table.take_rows(tokens)
    return jnp.take(table, tokens, axis=0)

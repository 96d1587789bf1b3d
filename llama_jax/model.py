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

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax import cpu_kernels
from llama_jax.config import LlamaConfig, rope_frequencies
from llama_jax.weight import Weight


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


class Blocks(nnx.Module):
    """All L transformer blocks, weights stacked on a leading L axis."""

    def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
        L, D, K, G, H, F = cfg.n_layers, cfg.dim, cfg.n_kv_heads, cfg.group, cfg.head_dim, cfg.ffn_dim
        init = nnx.initializers.normal(0.02)
        self.attn_norm = nnx.Param(jnp.ones((L, D), dtype))
        self.wqkv = nnx.Param(init(rngs.params(), (L, D, K, G + 2, H), dtype))
        self.bqkv = nnx.Param(jnp.zeros((L, K, G + 2, H), dtype)) if cfg.qkv_bias else None
        self.wo = nnx.Param(init(rngs.params(), (L, K, G, H, D), dtype))
        self.mlp_norm = nnx.Param(jnp.ones((L, D), dtype))
        self.w_gate_up = nnx.Param(init(rngs.params(), (L, D, 2, F), dtype))
        self.w_down = nnx.Param(init(rngs.params(), (L, F, D), dtype))

    def __call__(
        self,
        cfg: LlamaConfig,
        x,
        positions,
        inv_freq,
        k_cache,
        v_cache,
        ctx_len,
        context=None,
        rows=None,
        kernels=False,
        valid=None,
        kv_dtype=None,
    ):
        """x [B,T,D] -> (x [B,T,D], new_k [L,B,T,K,H], new_v [L,B,T,K,H]).

        With `context` (static), only the first `context` cache positions are attended to, and
        with `rows` (static) only the first `rows` slots; the slices are taken per layer inside
        the scan, so the whole-cache view is never copied.

        With `kernels` (the CPU kernels of `cpu_kernels.py`, on for a packed model), packed
        weights and, for one new token per row, the whole cache stay out of the scan's
        sliced inputs: the kernels get the layer index and read that layer in place, and
        attention reads each row's `ctx_len` valid positions (`context` does not matter). A
        chunk of one slot (prefill) attends in a kernel too, over its `ctx_len` valid cache
        positions, computing only its `valid` rows.
        `valid` (traced, kernels only): the kernels' matmuls compute only the first `valid`
        of the B*T token rows (a padded prefill chunk's true length).
        `kv_dtype` (static): the KV cache's element type; a chunk's own keys and values are
        rounded to it before they are attended to, so a position reads the same values whether
        it is in this chunk or in the cache later (a prompt prefilled whole and one continued
        from the prefix cache give the same numbers).
        """
        G = cfg.group
        weights = {
            "attn_norm": self.attn_norm.get_value(),
            "wqkv": self.wqkv.get_value(),
            "wo": self.wo.get_value(),
            "mlp_norm": self.mlp_norm.get_value(),
            "w_gate_up": self.w_gate_up.get_value(),
            "w_down": self.w_down.get_value(),
        }
        if self.bqkv is not None:
            weights["bqkv"] = self.bqkv.get_value()
        packed = {n: w for n, w in weights.items() if isinstance(w, cpu_kernels.PackedWeight)}
        scanned = {n: w for n, w in weights.items() if n not in packed}
        attend_kernel = kernels and k_cache is not None and x.shape[1] == 1
        chunk_kernel = kernels and x.shape[0] == 1 and x.shape[1] > 1  # one slot's prefill chunk
        if attend_kernel:
            xs = (scanned, None, None, jnp.arange(cfg.n_layers, dtype=jnp.int32))
        else:
            xs = (scanned, k_cache, v_cache, jnp.arange(cfg.n_layers, dtype=jnp.int32))

        def layer(x, xs):
            w, k_ctx, v_ctx, i = xs
            w = {**w, **{n: p.at(i, valid) for n, p in packed.items()}}
            if context is not None and k_ctx is not None:
                k_ctx, v_ctx = k_ctx[:rows, :context], v_ctx[:rows, :context]
            h = rms_norm(x, w["attn_norm"], cfg.norm_eps)
            qkv = dense(h, w["wqkv"], "BTD,DKXH->BTKXH")
            if "bqkv" in w:
                qkv = qkv + w["bqkv"].astype(qkv.dtype)
            q = rope(qkv[..., :G, :], positions, inv_freq)
            k = rope(qkv[..., G, :], positions, inv_freq)
            v = qkv[..., G + 1, :]
            if kv_dtype is not None and jnp.dtype(kv_dtype) != k.dtype:
                k, v = (a.astype(kv_dtype).astype(a.dtype) for a in (k, v))
            if attend_kernel:
                o = cpu_kernels.attend(q[:, 0], k[:, 0], v[:, 0], k_cache, v_cache, i, ctx_len)[:, None]
            elif chunk_kernel:
                kc, vc = (None, None) if k_ctx is None else (k_ctx[0], v_ctx[0])
                rows_valid = x.shape[1] if valid is None else valid
                o = cpu_kernels.attend_chunk(q[0], k[0], v[0], kc, vc, ctx_len[0], rows_valid)[None]
            else:
                o = attend(q, k, v, k_ctx, v_ctx, ctx_len)
            x = x + dense(o, w["wo"], "BTKGH,KGHD->BTD")
            h = rms_norm(x, w["mlp_norm"], cfg.norm_eps)
            gu = dense(h, w["w_gate_up"], "BTD,DCF->BTCF")
            x = x + dense(jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :], w["w_down"], "BTF,FD->BTD")
            return x, (k, v)

        x, (new_k, new_v) = jax.lax.scan(layer, x, xs)
        return x, new_k, new_v


class Llama(nnx.Module):
    """Embedding, stacked blocks, final norm and (tied or separate) output head."""

    def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.cfg = cfg
        self.dtype = dtype
        self.embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.dim), dtype))
        self.blocks = Blocks(cfg, dtype, rngs)
        self.norm = nnx.Param(jnp.ones((cfg.dim,), dtype))
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.dim), dtype))
        )
        self.inv_freq = Buffer(jnp.asarray(rope_frequencies(cfg), jnp.float32))
        self.kernels = False  # the CPU kernel path; `cpu_kernels.pack_model` turns it on

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
        x, new_k, new_v = self.blocks(
            self.cfg,
            x,
            positions,
            self.inv_freq.get_value(),
            k_cache,
            v_cache,
            ctx_len,
            context,
            rows,
            self.kernels,
            valid,
            kv_dtype,
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

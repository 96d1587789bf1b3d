"""The decode state: KV cache, per-slot lengths, last tokens and sampling rows.

Private layout (only this module and the jitted steps in `runner.py` know it):
`k, v: [L, B, S, K, H]` (float32, or 16-bit: `ModelRunner`'s `kv_dtype`) for L layers, B slots, S = max_seq_len positions, K KV heads, H head
dim; `lengths[b]` is the number of valid positions of slot b, which is also where its next
token is written. Entries at or past `lengths[b]` are garbage and always masked, so a slot
is reused without clearing it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig
from llama_jax.sampling import SlotSampling


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]
    lengths: jax.Array  # int32 [B]
    tokens: jax.Array  # int32 [B]: last sampled token, the next decode step's input
    history: jax.Array  # int32 [B, S]: the token id at each position (for penalties)
    prompt_len: jax.Array  # int32 [B]: where each slot's generated tokens start
    sampling: SlotSampling

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]


def init_state(cfg: LlamaConfig, max_slots: int, max_seq_len: int, dtype=jnp.float32) -> DecodeState:
    shape = (cfg.n_layers, max_slots, max_seq_len, cfg.n_kv_heads, cfg.head_dim)
    return DecodeState(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        lengths=jnp.zeros((max_slots,), jnp.int32),
        tokens=jnp.zeros((max_slots,), jnp.int32),
        history=jnp.zeros((max_slots, max_seq_len), jnp.int32),
        prompt_len=jnp.zeros((max_slots,), jnp.int32),
        sampling=SlotSampling.zeros(max_slots),
    )


def slot_context(cache: jax.Array, slot: jax.Array, context: int) -> jax.Array:
    """The first `context` (static) positions of one slot: [L, 1, C, K, H]."""
    L, _, _, K, H = cache.shape
    return jax.lax.dynamic_slice(cache, (0, slot, 0, 0, 0), (L, 1, context, K, H))


def write_chunk(cache: jax.Array, new: jax.Array, slot: jax.Array, start: jax.Array) -> jax.Array:
    """Write a chunk's rows new [L, 1, T, K, H] at positions start.. of one slot.

    A scatter with dropped out-of-range rows rather than `dynamic_update_slice`, which would
    clamp the start and shift a padded chunk that overhangs the end of the cache.
    """
    T = new.shape[2]
    return cache.at[:, slot, start + jnp.arange(T)].set(new[:, 0].astype(cache.dtype), mode="drop")


def write_step(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Write one token per slot: new [L, B, 1, K, H] at positions[b] (>= S means skip)."""
    B = new.shape[1]
    return cache.at[:, jnp.arange(B), positions].set(new[:, :, 0].astype(cache.dtype), mode="drop")

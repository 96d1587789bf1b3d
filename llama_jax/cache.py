"""The KV cache's layout and the helpers that read and write it inside the jitted steps.

Private layout (only this module and the jitted steps in `runner.py` know it):
`k, v: [L, B, S, K, H]` (float32, or 16-bit: `ModelRunner`'s `kv_dtype`) for L layers, B
slots, S = max_seq_len positions, K KV heads, H head dim; a slot's length
(`decode_state.DecodeState.lengths[b]`) is the number of its valid positions, which is also
where its next token is written. Entries at or past it are garbage and always masked, so a
slot is reused without clearing it. The rest of the decode state lives in `decode_state.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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

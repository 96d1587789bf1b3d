"""The decode state: everything a jitted step carries from one call to the next, per slot.

The KV cache (`cache.py`'s layout), each slot's length, last token, token history and sampling
rows (`sampling.SlotSampling`), as one pytree that `runner.py`'s steps take and donate. Only
this module builds it; the steps replace its fields.
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

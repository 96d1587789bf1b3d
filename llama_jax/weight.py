"""The one seam between the model and how its weights are stored (no imports from llama_jax,
so every weight format and the model can name it without a cycle)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax


@runtime_checkable
class Weight(Protocol):
    """What a matmul weight is to the model, whatever its storage: `model.dense` calls its
    `einsum`, the embedding lookup its `take_rows`. Implemented by `Int8Weight`, `Q4Weight` and
    the CPU kernels' `cpu_kernels.PackedWeight` (each chosen when the model is loaded:
    `params.Assembler`); a plain float array is the fourth kind, used as it is. A new weight
    format is a new class with these three members, not a flag in the model."""

    @property
    def shape(self) -> tuple[int, ...]: ...  # the float weight's shape

    def einsum(self, spec: str, x: jax.Array) -> jax.Array: ...  # `jnp.einsum(spec, x, w)`

    def take_rows(self, ids: jax.Array) -> jax.Array: ...  # float32 rows of a [V, D] table

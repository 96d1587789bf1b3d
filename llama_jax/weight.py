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


@runtime_checkable
class LayerStack(Protocol):
    """A weight stacked over layers that its matmul reads in place, by layer index (the CPU
    kernels' `PackedWeight`): the layer scan does not slice it (a sliced operand would be
    copied by XLA, every layer, every step) but passes `at_layer(layer, rows)`, a one-layer view (`at` would be any jax array);
    `rows` (traced or None): the real activation rows of a padded chunk (the rest are zeros)."""

    def at_layer(self, layer: jax.Array, rows: jax.Array | None = None) -> Weight: ...

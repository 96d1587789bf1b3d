"""int8 weight-only quantization with per-output-channel scales.

`Int8Weight(q, scale)` replaces a float weight: `q` int8 with the weight's shape, `scale`
float32 with the contracted (input) axes kept as size 1, so `q * scale` is the float weight.
`model.dense` calls its `einsum`: the int8->float convert is fused by XLA into the dot's
operand and the scale multiplies the output, so decode reads a quarter of the bytes. The embedding is quantized
per row (per vocabulary entry), which serves both the lookup and the tied output head.

`quantize_model` transforms a loaded `Llama` in place, so the model code has no int8 flags.
"""

from __future__ import annotations

import dataclasses

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8Weight:
    q: jax.Array  # int8, the weight's shape
    scale: jax.Array  # float32, contracted axes of size 1

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return self.q.astype(dtype) * self.scale.astype(dtype)

    def einsum(self, spec: str, x: jax.Array) -> jax.Array:
        """`einsum(spec, x, w)`: the int8->float convert feeds the dot (XLA fuses it), and the
        per-channel scale is applied to the much smaller output. The weight's kept axes must
        be the output's trailing axes, in order (true of every spec in `model.py`)."""
        inputs, out = spec.split("->")
        w_sub = inputs.split(",")[1]
        kept = [i for i, c in enumerate(w_sub) if c in out]
        assert out.endswith("".join(w_sub[i] for i in kept)), spec
        y = jnp.einsum(spec, x, self.q.astype(x.dtype))
        return y * self.scale.reshape([self.scale.shape[i] for i in kept]).astype(y.dtype)

    def take_rows(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.q, ids, axis=0).astype(jnp.float32) * jnp.take(self.scale, ids, axis=0)


def quantize_array(w: np.ndarray | jax.Array, axes: tuple[int, ...]) -> Int8Weight:
    """Symmetric per-channel int8: scale = max|w| over `axes` / 127."""
    w = np.asarray(w, np.float32)
    amax = np.max(np.abs(w), axis=axes, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return Int8Weight(jnp.asarray(q), jnp.asarray(scale))


def quantize_model(model: Llama, method: str = "int8") -> Llama:
    """Replace the matmul weights and the embedding of `model` by int8 weights, in place."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {method!r}")
    targets = [(model.blocks, name) for name in ("wqkv", "wo", "w_gate_up", "w_down")]
    targets += [(model, "embed")] + ([(model, "lm_head")] if model.lm_head is not None else [])
    for owner, name in targets:
        var: nnx.Param = getattr(owner, name)
        var.set_value(quantize_array(var.get_value(), CONTRACTED[name]))
    return model

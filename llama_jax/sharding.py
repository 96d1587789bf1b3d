"""Tensor-parallel placement over a `jax.sharding.Mesh` with `data` and `model` axes.

What it owns: building the mesh from `"data=D,model=M"`, each parameter's `PartitionSpec` from
the parameter table's split letter (`layout.py`, Megatron style: heads and MLP columns split on
`model`, output projections on their input dimension, the vocabulary of the embedding and head
on `model`), the decode state's layout (slots over `data`, the KV cache by KV heads over
`model`) and the declared shardings of `ModelRunner`'s jitted functions. XLA's SPMD
partitioner inserts the collectives; the model code knows nothing of devices.

A dimension that its mesh axis does not divide is replicated instead (`fit`): with fewer KV
heads than `model` devices (SmolLM2's 3 KV heads on 2, 4 or 8), the attention weights and the
KV cache are replicated, as "replicating them is often cheaper than sharding beyond K-way".
No mesh means none of this runs: one device, today's code path.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llama_jax import layout

log = logging.getLogger(__name__)

AXES = ("data", "model")

KV_CACHE = P(None, "data", None, "model", None)  # [L, B, S, K, H]


def make_mesh(spec: str | Mesh | None) -> Mesh | None:
    """A `Mesh` from `"data=D,model=M"` (an axis left out: data 1, model the rest of the
    devices; `"auto"`: every device on `model`), or `spec` itself if it is a Mesh."""
    if spec is None or isinstance(spec, Mesh):
        return spec
    devices = jax.devices()
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part == "auto":
            continue
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in AXES or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"mesh {spec!r}: expected data=D,model=M with positive integers")
        sizes[name.strip()] = int(value)
    data = sizes.get("data", 1)
    model = sizes.get("model", max(1, len(devices) // data))
    if data * model > len(devices):
        raise ValueError(f"mesh {spec!r} needs {data * model} devices, {len(devices)} available")
    # Auto axes: XLA's SPMD partitioner propagates shardings from the declared ones.
    return jax.make_mesh(
        (data, model), AXES, (jax.sharding.AxisType.Auto,) * 2, devices=devices[: data * model]
    )


def describe(mesh: Mesh | None) -> str:
    """One line for the startup log: backend, devices, mesh."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    where = f"{jax.process_count()} processes, " if jax.process_count() > 1 else ""
    shape = "no mesh" if mesh is None else "mesh " + ",".join(f"{k}={v}" for k, v in mesh.shape.items())
    return f"backend {jax.default_backend()} ({', '.join(kinds)}), {where}{len(devices)} devices, {shape}"


def fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """`spec` with every mesh axis that does not divide its dimension dropped (replicated)."""
    axes = [a if a is None or shape[i] % mesh.shape[a] == 0 else None for i, a in enumerate(spec)]
    while axes and axes[-1] is None:
        axes.pop()
    return P(*axes)


def rule(name: str) -> P:
    """A float parameter's PartitionSpec, from the parameter table (`layout.partition`); RoPE
    frequencies and anything else not in it are replicated."""
    return P(*layout.partition(name)) if name in layout.BY_NAME else P()


def param_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of float parameter `name` (e.g. "blocks/wqkv") of this shape."""
    return fit(rule(name), shape, mesh)


def int8_specs(spec: P, ndim: int, contracted: tuple[int, ...]) -> tuple[P, P]:
    """(q, scale) specs of an `Int8Weight` from its float weight's spec: `q` stores the kept
    axes, then the contracted ones; `scale` has size 1 on the contracted axes."""
    axes = tuple(spec) + (None,) * (ndim - len(spec))
    c = [ndim + a for a in contracted]
    kept = [i for i in range(ndim) if i not in c]
    return P(*(axes[i] for i in kept + c)), P(*(None if i in c else axes[i] for i in range(ndim)))


def _name(path) -> tuple[str, str | None]:
    """("blocks/wqkv", "q"|"scale"|None) from an NNX state path."""
    keys = [getattr(k, "key", getattr(k, "name", k)) for k in path]
    part = keys[-1] if keys[-1] in ("q", "scale") else None
    keys = [k for k in keys if k not in ("value", "q", "scale")]
    return "/".join(str(k) for k in keys), part


def state_shardings(state, mesh: Mesh):
    """NamedShardings for an NNX state (or any pytree of parameters under NNX paths), float
    and int8 weights alike; same structure as `state`."""
    from llama_jax.quantize import Int8Weight

    def one(path, x):
        name, _ = _name(path)
        if isinstance(x, Int8Weight):
            spec = param_spec(name, x.shape, mesh)
            q, s = int8_specs(spec, x.scale.ndim, x.contracted)
            return Int8Weight(NamedSharding(mesh, q), NamedSharding(mesh, s), x.contracted)
        return NamedSharding(mesh, param_spec(name, tuple(x.shape), mesh))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, Int8Weight))


def put(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array placed shard by shard: each device receives only its slice, so a model
    that fits across the devices but not on one still loads (and each process of a
    multi-host mesh reads only its own devices' slices)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def placer(mesh: Mesh) -> Callable:
    """`place(name, host_value)` for the loader: a float array or an `Int8Weight` of host
    arrays -> the same on the mesh, split by the rules."""
    from llama_jax.quantize import Int8Weight

    def place(name: str, x):
        if isinstance(x, Int8Weight):
            q, s = int8_specs(param_spec(name, x.shape, mesh), x.scale.ndim, x.contracted)
            return Int8Weight(
                put(x.q, NamedSharding(mesh, q)), put(x.scale, NamedSharding(mesh, s)), x.contracted
            )
        return put(x, NamedSharding(mesh, param_spec(name, np.shape(x), mesh)))

    return place


def decode_state_shardings(state, mesh: Mesh):
    """Shardings of a `DecodeState` (arrays or shapes): the KV cache `[L, B, S, K, H]` by slots
    over `data` and KV heads over `model`; every other field `[B, ...]` by slots over `data`."""
    slots = state.lengths.shape[0]
    if slots % mesh.shape["data"]:
        raise ValueError(
            f"max_slots ({slots}) must be a multiple of the mesh's data axis ({mesh.shape['data']})"
        )

    def one(path, x):
        field = getattr(path[0], "name", None)
        spec = fit(KV_CACHE, x.shape, mesh) if field in ("k", "v") else P("data")
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, state)


class JitShardings:
    """Declared input and output shardings of a runner's jitted functions under a mesh.

    Inputs by parameter name: `leaves` (the flattened model) by the partition rules, `state`
    (the donated `DecodeState`) by `decode_state_shardings`, everything else (tokens, slot,
    sampling rows, masks) replicated. Outputs: the new state keeps its layout, packed tokens
    and logprobs are replicated, so the host reads them from any device."""

    def __init__(self, mesh: Mesh, leaf_shardings: list, state_shardings_):
        self.mesh = mesh
        self.leaves = leaf_shardings
        self.state = state_shardings_
        self.replicated = NamedSharding(mesh, P())

    def whole_rows(self, x: jax.Array) -> jax.Array:
        """`x` [B, ...] constrained to rows split over `data` (when B divides) and nothing split
        over `model`: one all-gather of sharded columns (e.g. vocabulary-parallel logits)."""
        rows = "data" if x.shape[0] % self.mesh.shape["data"] == 0 else None
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(rows)))

    def jit(
        self,
        fn: Callable,
        out: str,
        static_argnames: tuple[str, ...] = (),
        donate_argnames: tuple[str, ...] = (),
    ) -> Callable:
        """`jax.jit(fn, ...)` with shardings; `out`: "state,packed", "state" or "packed".

        `jax.jit` takes no keyword arguments once `in_shardings` is declared, so `fn`'s static
        keyword-only arguments are passed positionally after the others."""
        by_name = {"leaves": self.leaves, "state": self.state}
        params = [
            p.name
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        n = len(params)

        def positional(*args):
            return fn(*args[:n], **dict(zip(static_argnames, args[n:], strict=True)))

        outs = {"state,packed": (self.state, self.replicated), "state": self.state, "packed": self.replicated}
        jitted = jax.jit(
            positional,
            in_shardings=tuple(by_name.get(name, self.replicated) for name in params),
            out_shardings=outs[out],
            static_argnums=tuple(range(n, n + len(static_argnames))),
            donate_argnums=tuple(params.index(name) for name in donate_argnames),
        )

        def call(*args, **static):
            return jitted(*args, *(static[name] for name in static_argnames))

        call.lower = lambda *args, **static: jitted.lower(*args, *(static[k] for k in static_argnames))
        return call


def jit(fn: Callable, out: str, *, shardings: JitShardings | None, **kwargs) -> Callable:
    """`jax.jit(fn, **kwargs)`, with declared shardings when there is a mesh."""
    return jax.jit(fn, **kwargs) if shardings is None else shardings.jit(fn, out, **kwargs)


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """`jax.distributed.initialize` before any other JAX call, on every host of a TPU pod slice
    or multi-host GPU cluster (arguments are auto-detected on Cloud TPU); after it,
    `jax.devices()` lists every process's devices and a mesh spans the hosts."""
    jax.distributed.initialize(coordinator, num_processes, process_id)
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def broadcast_schedule(payload: np.ndarray) -> np.ndarray:
    """Process 0's step schedule (a small int32 array: which function, slots, lengths,
    tokens) on every process, so every host calls the same jitted steps with the same shapes
    in the same order (lockstep). One process: returned as is."""
    if jax.process_count() == 1:
        return payload
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(payload))

"""The device side: jitted prefill, decode and embed over a flattened model state.

`Runner` is the scheduler's only door to the device (JetStream's Engine seam): the protocol the
scheduler is written against, so it runs as well on a fake whose outputs are computed by hand
(`tests/fake_runner.py`). `ModelRunner` implements it on a model; `lockstep.LeaderRunner`
wraps one for several hosts. `ModelRunner`'s jitted
functions are pure; what is static (and so compiled once per value) is only:

- `T`, the padded chunk length of a prefill (`prefill_buckets`: 16, 64, 256, then the largest
  chunk; padding rows cost little, a compile costs seconds);
- `C`, how many cache positions a step attends over (`context_buckets`, 128, 512, 2048...; 0
  for a chunk that starts a sequence), so a short conversation does not read the whole cache;
- `B`, the decode batch (`batch_buckets`: 1, 2, 4, 8... up to `max_slots`).

Each (function, T or B, C) is compiled ahead of time by a `StepCompiler` (`compiler.py`),
from abstract arguments, so the shapes a server has not met yet compile on a worker thread
while it serves (`warmup_shapes()` lists them in the order requests are likely to need them).

Everything per request (slot, start, true length, sampling values, seeds, the allowed-token
bitmask of constrained decoding) is a traced array, so new requests never compile. Prefill
writes straight into its slot (a fused prefill+insert: with prefix reuse and chunked prefill,
a chunk must attend over what the slot already holds), and the decode state is donated, so
the cache is updated in place.

Outputs are packed into one int32 array per call (token, logprob and the top-20 alternatives),
so the host pays one transfer per step.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llama_jax import cache as kv
from llama_jax import sharding
from llama_jax.compiler import Shape, StepCompiler
from llama_jax.config import LlamaConfig
from llama_jax.decode_state import DecodeState, init_state
from llama_jax.model import Llama
from llama_jax.sampling import (
    SamplingParams,
    SlotSampling,
    adjust_logits,
    apply_mask,
    mask_words,
    sample,
    top_logprobs,
)


def bucket_ladder(lo: int, hi: int, factor: int = 2) -> tuple[int, ...]:
    """lo, lo*factor, lo*factor**2, ... below hi, then hi."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= factor
    out.append(hi)
    return tuple(out)


# Prefill and context ladders grow 4x: every bucket is a compile (2-3 s each on a 2-core CPU
# for the default model, measured), while the padding a coarser ladder adds to a prompt chunk
# costs little (padding rows are skipped by the CPU kernels' matmuls).
LADDER = 4


def pick(buckets: tuple[int, ...], n: int) -> int:
    """Smallest bucket >= n."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def pack(tokens: jax.Array, logprobs: jax.Array, top: tuple[jax.Array, jax.Array]) -> jax.Array:
    """[B, 2 + 2K] int32: token, its logprob's bits, K top ids, K top logprobs' bits."""

    def bits(x):
        return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)

    return jnp.concatenate([tokens[:, None], bits(logprobs)[:, None], top[0], bits(top[1])], -1)


def unpack(out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B], logprobs [B]) from a packed step output."""
    out = np.asarray(out)
    return out[..., 0], out[..., 1].view(np.float32)


def unpack_top(out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top ids [B, K], top logprobs [B, K]) from a packed step output."""
    out = np.asarray(out)
    k = (out.shape[-1] - 2) // 2
    return out[..., 2 : 2 + k], np.ascontiguousarray(out[..., 2 + k :]).view(np.float32)


@runtime_checkable
class Runner(Protocol):
    """What the scheduler asks of the device. The state (`init_state`) is opaque to it: each
    call takes the current one and returns the next (a `ModelRunner` donates it). A step's
    output is `pack`'s layout, int32 [rows, 2 + 2K], read with `unpack` / `unpack_top` after
    `copy_to_host_async()` started its transfer; prefill's has one row, decode's one per slot
    up to the highest active one (or more)."""

    cfg: LlamaConfig  # vocab_size and dim are what the scheduler reads
    max_slots: int
    max_seq_len: int
    max_prefill_chunk: int  # the most prompt tokens one prefill call takes
    compiler: StepCompiler  # ready(shape) / request(shapes): which steps can run without a compile

    def init_state(self) -> Any: ...

    def prefill(
        self,
        state: Any,
        chunk: np.ndarray,
        slot: int,
        start: int,
        row: SlotSampling,
        mask: np.ndarray | None = None,
    ) -> tuple[Any, Any]:
        """Write `chunk` at positions start.. of `slot`; at a prompt's last chunk, take `row` as the
        slot's sampling values and sample its first token (allowed by `mask` [1, W])."""
        ...

    def decode(
        self, state: Any, active: np.ndarray, max_length: int, mask: np.ndarray | None = None
    ) -> tuple[Any, Any]:
        """One token for each `active` slot, whose sequences are at most `max_length` long."""
        ...

    def copy_slot(self, state: Any, src: int, dst: int, n: int) -> Any:
        """Slot dst gets (at least) the first n positions of slot src."""
        ...

    def embed(self, rows: list[list[int]], max_batch: int = 16) -> np.ndarray: ...

    def warmup(self, state: Any, progress: bool = False) -> Any: ...

    def prefill_shape(self, n: int, start: int) -> Shape: ...

    def decode_shape(self, rows: int, max_length: int) -> Shape: ...

    def copy_shape(self, n: int) -> Shape: ...

    def first_shapes(self) -> list[Shape]: ...

    def warmup_shapes(self) -> list[Shape]: ...


class ModelRunner:
    """Jitted steps for one model with `max_slots` decode slots of `max_seq_len` positions."""

    def __init__(
        self,
        model: Llama,
        max_slots: int,
        max_seq_len: int,
        max_prefill_chunk: int = 512,
        min_prefill_bucket: int = 16,
        min_context_bucket: int = 128,
        mesh: Mesh | None = None,
        kv_dtype: str | None = None,
    ):
        """`mesh`: run tensor-parallel over a `data` x `model` mesh (`sharding.py`); None: one
        device, no declared shardings. `kv_dtype`: the KV cache's element type ("float32",
        "bfloat16", "float16"); None or "auto": float16 where the CPU kernels read the cache
        (half the memory and bandwidth of float32, llama.cpp's default), else the model's
        activation dtype (bfloat16 on GPU/TPU, float32 on XLA:CPU, which has no fast 16-bit
        math)."""
        self.cfg = model.cfg
        self.dtype = model.dtype
        if kv_dtype in (None, "auto"):
            self.kv_dtype = jnp.float16 if model.kernels else model.dtype
        else:
            self.kv_dtype = jnp.dtype(kv_dtype).type
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        self.prefill_buckets = bucket_ladder(
            min(min_prefill_bucket, max_prefill_chunk), min(max_prefill_chunk, max_seq_len), LADDER
        )
        self.context_buckets = bucket_ladder(min(min_context_bucket, max_seq_len), max_seq_len, LADDER)
        # The CPU kernels' decode attention reads each slot's valid positions whatever the
        # bucket, so a packed model compiles decode for one context only; elsewhere decode
        # reads all C positions of every row, so its contexts keep the finer ladder.
        self.decode_contexts = (
            (max_seq_len,)
            if model.kernels
            else bucket_ladder(min(min_context_bucket, max_seq_len), max_seq_len)
        )
        # Under a mesh, a decode batch smaller than the data axis would leave replicas idle.
        # Powers of two: a decode step's cost grows with its batch (at 8 streams, batch 16 gave
        # half the throughput of batch 8), and there are few of them.
        self.batch_buckets = bucket_ladder(min(mesh.shape["data"] if mesh else 1, max_slots), max_slots)
        # Flatten the NNX state once: per-call traversal of Variables costs milliseconds.
        self._graphdef, state = nnx.split(model)
        self._leaves, self._treedef = jax.tree.flatten(state)
        self._shard = None
        if mesh is not None:
            leaf_shardings = jax.tree.leaves(sharding.state_shardings(state, mesh))
            self._leaves = [jax.device_put(x, s) for x, s in zip(self._leaves, leaf_shardings, strict=True)]
            states = sharding.decode_state_shardings(jax.eval_shape(self._new_state), mesh)
            self._shard = sharding.JitShardings(mesh, leaf_shardings, states)
            self._init_sharded = jax.jit(self._new_state, out_shardings=states)
        jit = functools.partial(sharding.jit, shardings=self._shard)
        self._prefill = jit(
            self._prefill_impl, "state,packed", static_argnames=("context",), donate_argnames=("state",)
        )
        self._decode = jit(
            self._decode_impl,
            "state,packed",
            static_argnames=("context", "batch"),
            donate_argnames=("state",),
        )
        self._embed = jit(self._embed_impl, "packed")
        # Unconstrained steps pass these device-resident all-allowed bitmasks: no transfer.
        self.mask_words = mask_words(self.cfg.vocab_size)
        self.no_mask = jnp.full((max_slots, self.mask_words), -1, jnp.int32)
        self._no_mask_row = self.no_mask[:1]
        self._copy_slot = jit(
            self._copy_slot_impl, "state", static_argnames=("context",), donate_argnames=("state",)
        )
        if self._shard is not None:
            self.no_mask = jax.device_put(self.no_mask, self._shard.replicated)
            self._no_mask_row = jax.device_put(self._no_mask_row, self._shard.replicated)
        self._state_spec = jax.tree.map(_spec, jax.eval_shape(self._new_state))
        self._row_spec = jax.tree.map(_spec, SlotSampling.from_params([SamplingParams(temperature=0.0)], [0]))
        self.compiler = StepCompiler(self._lower)

    def _model(self, leaves) -> Llama:
        return nnx.merge(self._graphdef, jax.tree.unflatten(self._treedef, leaves))

    def _whole_vocab(self, logits: jax.Array) -> jax.Array:
        """Under a mesh, gather vocabulary-sharded logits [B, V] once, so sampling (sorts,
        cumulative sums, penalties) runs on whole rows instead of in dozens of collectives."""
        return logits if self._shard is None else self._shard.whole_rows(logits)

    def _new_state(self) -> DecodeState:
        return init_state(self.cfg, self.max_slots, self.max_seq_len, self.kv_dtype)

    def init_state(self) -> DecodeState:
        if self._shard is None:
            return self._new_state()
        return self._init_sharded()  # zeros made in place, shard by shard

    # -- jitted bodies -------------------------------------------------------------------------

    def _prefill_impl(
        self, leaves, state: DecodeState, tokens, slot, start, true_len, row: SlotSampling, mask, *, context
    ):
        """tokens [1,T] at positions start..start+T of `slot`; samples the token after true_len
        among those allowed by mask [1, W]."""
        model = self._model(leaves)
        T = tokens.shape[1]
        kvd = state.k.dtype
        positions = start + jnp.arange(T, dtype=jnp.int32)[None]
        if context:
            k_ctx = kv.slot_context(state.k, slot, context)
            v_ctx = kv.slot_context(state.v, slot, context)
            h, nk, nv = model.hidden(
                tokens, positions, k_ctx, v_ctx, start[None], valid=true_len, kv_dtype=kvd
            )
        else:
            h, nk, nv = model.hidden(tokens, positions, valid=true_len, kv_dtype=kvd)
        last = jax.lax.dynamic_index_in_dim(h[0], true_len - 1, keepdims=True)  # [1, D]
        end = start + true_len
        history = state.history.at[slot, start + jnp.arange(T)].set(tokens[0], mode="drop")
        logits = self._whole_vocab(model.logits(last))
        row_history = jax.lax.dynamic_index_in_dim(history, slot, keepdims=True)
        logits = apply_mask(adjust_logits(logits, row, row_history, end[None], end[None]), mask)
        token, logprob = sample(logits, row, end[None], model.kernels)
        sampling = jax.tree.map(lambda all_, r: all_.at[slot].set(r[0]), state.sampling, row)
        new_state = DecodeState(
            k=kv.write_chunk(state.k, nk, slot, start),
            v=kv.write_chunk(state.v, nv, slot, start),
            lengths=state.lengths.at[slot].set(end),
            tokens=state.tokens.at[slot].set(token[0]),
            history=history,
            prompt_len=state.prompt_len.at[slot].set(end),
            sampling=sampling,
        )
        return new_state, pack(token, logprob, top_logprobs(logits, row, model.kernels))

    def _decode_impl(self, leaves, state: DecodeState, active, mask, *, context, batch):
        """One token for each of the first `batch` slots (static: a power-of-two bucket, so a
        lone stream does not pay for every slot); inactive ones compute but change nothing.
        mask [max_slots, W]: each slot's allowed tokens (all ones when unconstrained)."""
        model = self._model(leaves)
        b = batch
        active, lengths, tokens = active[:b], state.lengths[:b], state.tokens[:b]
        sampling = jax.tree.map(lambda a: a[:b], state.sampling)
        h, nk, nv = model.hidden(
            tokens[:, None], lengths[:, None], state.k, state.v, lengths, context, b, kv_dtype=state.k.dtype
        )
        logits = self._whole_vocab(model.logits(h[:, 0]))
        write_at = jnp.where(active, lengths, state.max_seq_len)
        history = state.history.at[jnp.arange(b), write_at].set(tokens, mode="drop")
        logits = adjust_logits(logits, sampling, history[:b], state.prompt_len[:b], lengths + 1)
        logits = apply_mask(logits, mask[:b])
        token, logprob = sample(logits, sampling, lengths + 1, model.kernels)
        new_state = DecodeState(
            k=kv.write_step(state.k, nk, write_at),
            v=kv.write_step(state.v, nv, write_at),
            lengths=state.lengths.at[:b].add(active.astype(jnp.int32)),
            tokens=state.tokens.at[:b].set(jnp.where(active, token, tokens)),
            history=history,
            prompt_len=state.prompt_len,
            sampling=state.sampling,
        )
        return new_state, pack(token, logprob, top_logprobs(logits, sampling, model.kernels))

    @staticmethod
    def _copy_slot_impl(state: DecodeState, src, dst, *, context) -> DecodeState:
        """Slot dst gets the first `context` (static) positions of slot src's cache and token
        history."""
        c = context
        return dataclasses.replace(
            state,
            k=state.k.at[:, dst, :c].set(state.k[:, src, :c]),
            v=state.v.at[:, dst, :c].set(state.v[:, src, :c]),
            history=state.history.at[dst, :c].set(state.history[src, :c]),
        )

    def copy_slot(self, state: DecodeState, src: int, dst: int, n: int) -> DecodeState:
        """Slot dst gets (at least) the first n positions of slot src's cache and history (a
        shared prompt prefix): a context bucket's worth, so the copy compiles once per bucket."""
        step = self.compiler.get(self.copy_shape(n))
        return step(state, np.int32(src), np.int32(dst))

    def copy_shape(self, n: int) -> Shape:
        """The compiled shape a copy of a slot's first n positions runs in."""
        return ("copy", 0, pick(self.context_buckets, max(n, 1)))

    def _embed_impl(self, leaves, tokens, lengths):
        """Mean of final hidden states over each row's first lengths[b] tokens, L2-normalized."""
        model = self._model(leaves)
        B, T = tokens.shape
        h, _, _ = model.hidden(tokens, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
        mask = (jnp.arange(T)[None, :] < lengths[:, None]).astype(jnp.float32)
        mean = jnp.einsum("BTD,BT->BD", h.astype(jnp.float32), mask) / jnp.maximum(lengths, 1)[:, None]
        return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)

    # -- host-facing calls -------------------------------------------------------------------

    def prefill(
        self,
        state: DecodeState,
        chunk: np.ndarray,
        slot: int,
        start: int,
        row: SlotSampling,
        mask: np.ndarray | None = None,
    ) -> tuple[DecodeState, jax.Array]:
        """Prefill one chunk (<= the largest prefill bucket) of a slot's prompt at `start`;
        `mask` [1, W] constrains the token sampled after the prompt's last chunk."""
        n = len(chunk)
        tokens = np.zeros((1, pick(self.prefill_buckets, n)), np.int32)
        tokens[0, :n] = chunk
        mask = self._no_mask_row if mask is None else mask
        step = self.compiler.get(self.prefill_shape(n, start))
        return step(self._leaves, state, tokens, np.int32(slot), np.int32(start), np.int32(n), row, mask)

    def prefill_shape(self, n: int, start: int) -> Shape:
        """The compiled shape a chunk of n tokens at `start` runs in."""
        return (
            "prefill",
            pick(self.prefill_buckets, n),
            0 if start == 0 else pick(self.context_buckets, start),
        )

    def decode(
        self, state: DecodeState, active: np.ndarray, max_length: int, mask: np.ndarray | None = None
    ) -> tuple[DecodeState, jax.Array]:
        """One decode step; `max_length` bounds the valid positions of every active slot. The
        output has a row for each slot up to the highest active one (rounded up to a bucket).
        `mask` [max_slots, W]: allowed-token bitmasks, None when no slot is constrained."""
        active = np.asarray(active, bool)
        step = self.compiler.get(
            self.decode_shape(int(np.flatnonzero(active).max(initial=0)) + 1, max_length)
        )
        return step(self._leaves, state, active, self.no_mask if mask is None else mask)

    def decode_shape(self, rows: int, max_length: int) -> Shape:
        """The compiled shape a decode step over the first `rows` slots runs in."""
        return ("decode", pick(self.batch_buckets, rows), pick(self.decode_contexts, max(max_length, 1)))

    def embed(self, rows: list[list[int]], max_batch: int = 16) -> np.ndarray:
        """Embeddings [len(rows), D] (float32, L2-normalized), batched by padded length."""
        out = np.zeros((len(rows), self.cfg.dim), np.float32)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for lo in range(0, len(order), max_batch):
            idx = order[lo : lo + max_batch]
            T = pick(self.prefill_buckets + self.context_buckets[1:], max(len(rows[i]) for i in idx))
            B = pick(bucket_ladder(1, max_batch), len(idx))
            tokens = np.zeros((B, T), np.int32)
            lengths = np.zeros((B,), np.int32)
            for j, i in enumerate(idx):
                tokens[j, : len(rows[i])] = rows[i]
                lengths[j] = len(rows[i])
            out[idx] = np.asarray(self._embed(self._leaves, tokens, lengths))[: len(idx)]
        return out

    @functools.cached_property
    def max_prefill_chunk(self) -> int:
        return self.prefill_buckets[-1]

    def first_shapes(self) -> list[Shape]:
        """What a first short request needs: its prompt's chunk and a one-stream decode step."""
        return [
            ("prefill", self.prefill_buckets[0], 0),
            ("decode", self.batch_buckets[0], self.decode_contexts[0]),
        ]

    def warmup_shapes(self) -> list[Shape]:
        """Every (function, T or B, C) the engine can call, in the order requests are likely
        to need them: a first short request, longer first prompts, more streams, then chunks
        that continue a cached prefix (a chat's next turn) over longer and longer contexts. A
        chunk may start anywhere (after a reused prefix), so prefill meets every context bucket."""
        first = self.first_shapes()
        shapes = [*first]
        shapes += [("prefill", t, 0) for t in self.prefill_buckets]
        shapes += [("decode", b, c) for c in self.decode_contexts for b in self.batch_buckets]
        for c in self.context_buckets:
            shapes += [("prefill", t, c) for t in self.prefill_buckets] + [("copy", 0, c)]
        return list(dict.fromkeys(shapes))

    def _lower(self, shape: Shape):
        """The lowered step of one shape, from abstract arguments (no device state is read)."""
        kind, n, c = shape
        state = self._state_spec
        i32 = jax.ShapeDtypeStruct((), jnp.int32)
        if kind == "copy":
            return self._copy_slot.lower(state, i32, i32, context=c)
        if kind == "prefill":
            tokens = jax.ShapeDtypeStruct((1, n), jnp.int32)
            row, mask = self._row_spec, _spec(self._no_mask_row)
            return self._prefill.lower(self._leaves, state, tokens, i32, i32, i32, row, mask, context=c)
        active = jax.ShapeDtypeStruct((self.max_slots,), jnp.bool_)
        return self._decode.lower(self._leaves, state, active, _spec(self.no_mask), context=c, batch=n)

    def warmup(self, state: DecodeState, progress: bool = False) -> DecodeState:
        """Compile (or load from the persistent cache) every step the engine can call, now."""
        self.compiler.compile_all(self.warmup_shapes(), progress=progress)
        return state


def _spec(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype)

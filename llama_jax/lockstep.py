"""Several hosts, one model: process 0 schedules, every process runs the same steps.

Under `jax.distributed` a mesh spans the devices of every process, and each jitted step is one
SPMD program that every process must launch, with the same shapes, in the same order. Only
process 0 runs HTTP and the scheduler; its `ModelRunner` is wrapped in a `LeaderRunner` that,
before each device call (prefill, decode, copy_slot, embed, warmup), broadcasts the call and
its host arguments (token ids, slot, sampling rows, masks: the step's schedule, small numpy
values) to the other processes. They run `follow(scheduler)`: receive a call, replay it on their
own runner and decode state, repeat. The device state itself is never sent: each process
holds its shards of the weights and KV cache, and the steps' collectives keep them consistent.

One process (the usual case): `for_process(runner)` returns the runner unchanged.
"""

from __future__ import annotations

import logging
import pickle

import jax
import numpy as np

from llama_jax.compiler import Shape
from llama_jax.runner import ModelRunner, Runner
from llama_jax.sharding import broadcast_schedule

log = logging.getLogger(__name__)

CHUNK = 1 << 16  # int32 words per broadcast: fixed, so the broadcast compiles once
CALLS = ("prefill", "decode", "copy_slot", "embed", "warmup")


def _send(message: object) -> None:
    data = np.frombuffer(pickle.dumps(message), np.uint8)
    words = np.zeros(-(-len(data) // (4 * CHUNK)) * CHUNK, np.int32)
    words.view(np.uint8)[: len(data)] = data
    broadcast_schedule(np.array([len(data)], np.int32))
    for i in range(0, len(words), CHUNK):
        broadcast_schedule(words[i : i + CHUNK])


def _receive() -> object:
    n = int(broadcast_schedule(np.zeros(1, np.int32))[0])
    words = np.concatenate(
        [broadcast_schedule(np.zeros(CHUNK, np.int32)) for _ in range(-(-n // (4 * CHUNK)))]
    )
    # The payload comes from process 0 of this same program: trusted like the code itself.
    return pickle.loads(words.view(np.uint8)[:n].tobytes())  # noqa: S301


class LeaderRunner:
    """Process 0's `Runner`: each device call is broadcast, then run by the wrapped
    `ModelRunner`; sizes, shapes and the compiler are the wrapped runner's."""

    def __init__(self, runner: ModelRunner):
        self._runner = runner
        self.cfg = runner.cfg
        self.max_slots = runner.max_slots
        self.max_seq_len = runner.max_seq_len
        self.max_prefill_chunk = runner.max_prefill_chunk
        self.compiler = runner.compiler

    def init_state(self):
        return self._runner.init_state()  # zeros made on every process alike: nothing to send

    def prefill_shape(self, n: int, start: int) -> Shape:
        return self._runner.prefill_shape(n, start)

    def decode_shape(self, rows: int, max_length: int) -> Shape:
        return self._runner.decode_shape(rows, max_length)

    def copy_shape(self, n: int) -> Shape:
        return self._runner.copy_shape(n)

    def first_shapes(self) -> list[Shape]:
        return self._runner.first_shapes()

    def warmup_shapes(self) -> list[Shape]:
        return self._runner.warmup_shapes()

    def _call(self, name: str, state, *args, **kwargs):
        _send((name, _host(args), _host(kwargs)))
        fn = getattr(self._runner, name)
        return fn(*args, **kwargs) if state is None else fn(state, *args, **kwargs)

    def prefill(self, state, *args, **kwargs):
        return self._call("prefill", state, *args, **kwargs)

    def decode(self, state, *args, **kwargs):
        return self._call("decode", state, *args, **kwargs)

    def copy_slot(self, state, *args, **kwargs):
        return self._call("copy_slot", state, *args, **kwargs)

    def warmup(self, state, *args, **kwargs):
        return self._call("warmup", state, *args, **kwargs)

    def embed(self, *args, **kwargs):
        return self._call("embed", None, *args, **kwargs)


def _host(values):
    """Host copies of array arguments (a mask may be a device array; only values travel)."""
    return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, values)


def for_process(runner: ModelRunner) -> Runner:
    """The runner this process's scheduler should use: a `LeaderRunner` on process 0 of several,
    the runner itself otherwise."""
    if jax.process_count() > 1 and jax.process_index() == 0:
        return LeaderRunner(runner)
    return runner


def follow(scheduler) -> None:
    """Replay process 0's device calls on this process's `scheduler` (its runner and decode
    state), for as long as the process runs (it is stopped with process 0's service)."""
    runner = scheduler.runner
    log.info("process %d follows process 0's schedule", jax.process_index())
    while True:
        name, args, kwargs = _receive()
        if name not in CALLS:
            raise RuntimeError(f"unknown lockstep call {name!r}")
        if name == "embed":
            runner.embed(*args, **kwargs)
        elif name in ("copy_slot", "warmup"):
            scheduler.state = getattr(runner, name)(scheduler.state, *args, **kwargs)
        else:
            scheduler.state, _ = getattr(runner, name)(scheduler.state, *args, **kwargs)

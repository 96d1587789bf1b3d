"""Step shapes compiled ahead of time (`llama_jax/compiler.py`) on a tiny model: a request
whose shape is not compiled yet waits while a running stream keeps decoding and the worker
compiles it; a background plan compiles every shape, after which nothing compiles."""

from __future__ import annotations

import threading
import time

import numpy as np
from tiny import gguf_metadata, random_tensors, tiny_config

from llama_jax.runner import ModelRunner
from llama_jax.sampling import SamplingParams
from llama_jax.scheduler import Scheduler
from llama_jax.stopping import StopRules
from llama_jax.tokenizer import Tokenizer
from llama_jax.weights import build_model, pack_tensors
from llama_jax.xla_cache import CompileCounter

GREEDY = SamplingParams(temperature=0), StopRules(max_tokens=40, ignore_eos=True)


def fresh_scheduler(max_seq_len: int = 128) -> tuple[Scheduler, list[tuple[tuple, str]]]:
    """An scheduler on a new runner (nothing compiled), and a record of (shape, thread) compiles."""
    cfg = tiny_config()
    model = build_model(cfg, pack_tensors(cfg, random_tensors(cfg).items(), "tiny"))
    runner = ModelRunner(model, max_slots=4, max_seq_len=max_seq_len, max_prefill_chunk=64)
    compiled: list[tuple[tuple, str]] = []
    lower = runner.compiler._lower

    def recording(shape):
        compiled.append((shape, threading.current_thread().name))
        return lower(shape)

    runner.compiler._lower = recording
    tokenizer = Tokenizer.from_gguf_metadata(gguf_metadata(cfg), "tiny")
    return Scheduler(runner, tokenizer, eos_ids=(2,)), compiled


def test_a_new_prompt_waits_for_its_compile_while_a_running_stream_decodes():
    scheduler, compiled = fresh_scheduler()
    runner = scheduler.runner
    runner.compiler.compile_all(runner.first_shapes())
    # The first shapes: a 16-token chunk, batch 1.
    short = scheduler.submit(
        [5, 6, 7], SamplingParams(temperature=0), StopRules(max_tokens=120, ignore_eos=True)
    )
    for _ in range(3):
        scheduler.step()
    assert short.output_ids and {s for s, _ in compiled} == set(runner.first_shapes())
    longer = scheduler.submit(list(range(3, 43)), *GREEDY)  # 40 tokens: a 64-token chunk, batch 4
    wanted = {runner.prefill_shape(40, 0), runner.decode_shape(2, 100)}
    assert not wanted & set(runner.first_shapes())
    with runner.compiler._compile_lock:  # the worker cannot compile yet: the steps must not wait for it
        before = len(short.output_ids)
        for _ in range(5):
            scheduler.step()
        assert longer.prefilled == 0 and len(short.output_ids) == before + 5
        assert runner.compiler.status()["pending"] == 2
    deadline = time.monotonic() + 120
    while not longer.finished:
        assert time.monotonic() < deadline
        scheduler.step()
    assert len(longer.output_ids) == 40
    assert {s for s, _ in compiled} == set(runner.first_shapes()) | wanted
    # The chunk's shape compiled on the worker (the decode shape too, unless the stream ended
    # first: with nothing running, the scheduler thread compiles what is not started yet itself).
    assert (runner.prefill_shape(40, 0), runner.compiler._name) in compiled
    runner.compiler.close()


def test_a_background_plan_compiles_every_shape_and_then_nothing_compiles():
    scheduler, compiled = fresh_scheduler()
    runner = scheduler.runner
    runner.compiler.plan(runner.warmup_shapes())
    deadline = time.monotonic() + 300
    while runner.compiler.status()["pending"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert sorted(s for s, _ in compiled) == sorted(runner.warmup_shapes())
    assert runner.compiler.status() == {"compiled": len(compiled), "pending": 0, "compiling": None}
    rng = np.random.default_rng(0)
    with CompileCounter() as c:
        reqs = [scheduler.submit(rng.integers(3, 250, n).tolist(), *GREEDY) for n in (3, 20, 70, 80)]
        while not all(r.finished for r in reqs):
            scheduler.step()
        turn2 = reqs[0].prompt_ids + reqs[0].output_ids + [9, 9]  # continues a cached prefix
        r = scheduler.submit(turn2, *GREEDY)
        while not r.finished:
            scheduler.step()
    assert r.cached_tokens and c.traces == 0 and c.compiles == 0
    runner.compiler.close()

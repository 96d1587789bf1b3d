"""Core benchmark: load time, compile times, prefill and decode throughput, peak memory.

    python bench/bench_core.py [--model ALIAS_OR_PATH] [--dtypes float32,int8,q4,auto,float32:xla]

A dtype with the suffix `:xla` runs without the CPU kernels (`cpu_kernels.py`), on XLA's own
ops, for a before/after in one run. Runs each dtype in its own subprocess (clean peak-memory figure) and prints one table. Decode
is timed through the runner's jitted step at a fixed context bucket, all slots active, with
the outputs read back every step as the engine does, at every batch bucket up to 16 (XLA:CPU
picks kernels by shape, so one size says little about the next). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def measure(model: str | None, dtype: str, seq: int, steps: int) -> dict:
    """`dtype` is a float dtype (float weights), or "int8", "q4" or "auto" (float32
    activations, weights in that `quantize` format); ":xla" after it turns the CPU kernels off."""
    import jax

    from llama_jax.runner import ModelRunner, unpack
    from llama_jax.sampling import SamplingParams, SlotSampling
    from llama_jax.weights import load_model

    t0 = time.perf_counter()
    label = dtype
    dtype, _, variant = dtype.partition(":")
    quantize = dtype if dtype in ("int8", "q4", "auto") else "none"
    loaded = load_model(
        model,
        dtype="float32" if quantize != "none" else dtype,
        quantize=quantize,
        kernels=False if variant == "xla" else None,
    )
    r: dict = {"dtype": label, "load_s": time.perf_counter() - t0}
    row = SlotSampling.from_params([SamplingParams(temperature=0)], [0])
    rng = np.random.default_rng(0)
    for batch in (1, 2, 4, 8, 16):  # every decode batch bucket of a 16-slot runner
        runner = ModelRunner(loaded.model, max_slots=batch, max_seq_len=seq)
        state = runner.init_state()
        for n in (128, 512):
            if batch != 1:
                break
            prompt = rng.integers(100, 20000, n).astype(np.int32)
            t = time.perf_counter()
            state, out = runner.prefill(state, prompt, 0, 0, row)
            out.block_until_ready()
            r[f"compile_prefill_{n}_s"] = time.perf_counter() - t
            t = time.perf_counter()
            reps = 3
            for _ in range(reps):
                state, out = runner.prefill(state, prompt, 0, 0, row)
                unpack(out)
            r[f"prefill_{n}_tok_s"] = n * reps / (time.perf_counter() - t)
        for s in range(batch):
            state, out = runner.prefill(state, rng.integers(100, 20000, 64).astype(np.int32), s, 0, row)
        active = np.ones(batch, bool)
        t = time.perf_counter()
        state, out = runner.decode(state, active, 256)
        unpack(out)
        r[f"compile_decode_b{batch}_s"] = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(steps):
            state, out = runner.decode(state, active, 256)
            unpack(out)
        r[f"decode_b{batch}_tok_s"] = batch * steps / (time.perf_counter() - t)
        if batch == 16:  # the cost of constrained decoding on the device, interleaved for fairness
            mask = np.full((batch, runner.mask_words), -1, np.int32)
            mask[0] = rng.integers(-(2**31), 2**31, runner.mask_words).astype(np.int32)  # half the vocabulary
            spent = {"no_mask": 0.0, "one_row_masked": 0.0}
            for _ in range(steps):
                for name, m in (("no_mask", None), ("one_row_masked", mask)):
                    t = time.perf_counter()
                    state, out = runner.decode(state, active, 256, m)
                    unpack(out)
                    spent[name] += time.perf_counter() - t
            for name, seconds in spent.items():
                r[f"decode_b16_{name}_tok_s"] = batch * steps / seconds
        del state
    r.update(matmul_baseline(loaded.config, "float32" if quantize != "none" else dtype, steps))
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r["backend"] = jax.default_backend()
    return r


def matmul_baseline(cfg, dtype: str, steps: int) -> dict:
    """The same weight bytes as a bare chain of matmuls (scan over layers, then the head): the
    ceiling this machine allows a decode step, measured in the same run for a fair ratio."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    per_layer = cfg.dim * cfg.head_dim * (cfg.n_heads * 2 + cfg.n_kv_heads * 2) + 3 * cfg.dim * cfg.ffn_dim
    w = jnp.full((cfg.n_layers, cfg.dim, per_layer // cfg.dim), 0.01, dt)
    e = jnp.full((cfg.vocab_size, cfg.dim), 0.01, dt)

    @jax.jit
    def step(x, w, e):
        x, _ = jax.lax.scan(lambda x, wl: ((x @ wl)[:, : cfg.dim] + x, None), x, w)
        return x @ e.T

    out = {}
    for batch in (1, 16):
        x = jnp.ones((batch, cfg.dim), dt)
        step(x, w, e).block_until_ready()
        t = time.perf_counter()
        for _ in range(steps):
            np.asarray(step(x, w, e))
        out[f"matmul_only_b{batch}_tok_s"] = batch * steps / (time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtypes", default="float32,int8,auto,float32:xla,int8:xla,bfloat16")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.one, args.seq, args.steps)))
        return
    rows = []
    for dtype in args.dtypes.split(","):
        cmd = [sys.executable, __file__, "--one", dtype, "--seq", str(args.seq), "--steps", str(args.steps)]
        if args.model:
            cmd += ["--model", args.model]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    keys = [k for k in rows[0] if k not in ("dtype", "backend")]
    print(
        f"model={args.model or 'smollm2-135m-instruct'} backend={rows[0]['backend']} max_seq_len={args.seq} decode context bucket=256"
    )
    print("| metric | " + " | ".join(r["dtype"] for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{r[k]:.1f}" if r[k] >= 10 else f"{r[k]:.2f}" for r in rows) + " |")
    if "decode_b1_tok_s" in rows[0]:
        for r in rows:
            print(
                f"{r['dtype']}: batch 16 aggregate / batch 1 = {r['decode_b16_tok_s'] / r['decode_b1_tok_s']:.1f}x"
            )


if __name__ == "__main__":
    main()

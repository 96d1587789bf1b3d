"""Tensor-parallel benchmark: compile time and collectives per decode step, for each mesh.

    python bench/bench_mesh.py [--devices 8] [--slots 8] [--seq 256]

For the default model (SmolLM2-135M, 3 KV heads: attention replicated beyond 1 model device)
and a random-weight model with Llama-3.2-1B shapes cut to 2 layers (8 KV heads: split on every
model axis here), on one device and on meshes (data, model) = (1, 8), (2, 4), (4, 2), (8, 1):
the compile time of one decode step (all slots, the full context) and of one 16-token prefill,
and the collectives in the compiled decode step's HLO, counted as executed (an op inside the
layer scan counts once per layer). On CPU the devices are virtual
(`--xla_force_host_platform_device_count`, set here before JAX starts); the persistent
compilation cache is off so compile times are real. Virtual devices share the host's cores,
so step times here say nothing about real chips; (8, 1) holds 8 whole copies of the weights
(about 5 GiB of host memory for the 1B-shaped model). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import Counter

MESHES = [None, (1, 8), (2, 4), (4, 2), (8, 1)]
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_OP = re.compile(r"=\s*\S+(?:\[[^\]]*\])?(?:\{[^}]*\})?\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def collectives(hlo: str, n_layers: int) -> tuple[Counter, Counter]:
    """(per layer, outside the layers) collective ops of a compiled module: those in the body
    of the layer scan (the while loop of `n_layers` trips), and all others, counted once each
    (both branches of a conditional included, so `outside` is an upper bound)."""
    comps: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        m = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if m and not line.startswith(" "):
            name = m.group(1)
            comps[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(line)

    def called(comp: str, seen: set[str]) -> set[str]:
        for line in comps.get(comp, ()):
            for c in re.findall(
                r"(?:body|calls|to_apply|computation|computations)=\{?([^,}\s]+(?:,\s*%[\w.\-]+)*)", line
            ):
                for sub in re.findall(r"[\w.\-]+", c):
                    if sub in comps and sub not in seen:
                        seen.add(sub)
                        called(sub, seen)
        return seen

    def ops(names) -> Counter:
        return Counter(op.group(1) for n in names for line in comps[n] if (op := _OP.search(line)))

    layer: set[str] = set()
    for lines in comps.values():
        for line in lines:
            if f'"known_trip_count":{{"n":"{n_layers}"}}' in line and (
                b := re.search(r"\bbody=%?([\w.\-]+)", line)
            ):
                layer |= called(b.group(1), {b.group(1)})
    return ops(layer), ops(set(comps) - layer)


def models():
    import numpy as np

    from llama_jax.config import LlamaConfig
    from llama_jax.gguf import GGUFFile
    from llama_jax.weights import pack_tensors, resolve_model_path

    gg = GGUFFile(resolve_model_path(None)[1])
    cfg = gg.config()
    yield "smollm2-135m f32", cfg, pack_tensors(cfg, gg.tensors(cfg), "smollm2"), "float32"
    cfg = LlamaConfig(
        vocab_size=128256,
        dim=2048,
        n_layers=2,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        ffn_dim=8192,
        norm_eps=1e-5,
        rope_theta=500000.0,
        tie_embeddings=True,
        qkv_bias=False,
        context_length=8192,
        bos_id=0,
        eos_ids=(1,),
        architecture="llama",
    )
    L, D, K, G, H, F, V = (
        cfg.n_layers,
        cfg.dim,
        cfg.n_kv_heads,
        cfg.group,
        cfg.head_dim,
        cfg.ffn_dim,
        cfg.vocab_size,
    )
    rng = np.random.default_rng(0)

    def w(*shape):
        return rng.standard_normal(shape, np.float32) * 0.02

    state = {
        "embed": w(V, D),
        "norm": np.ones(D, np.float32),
        "inv_freq": np.ones(H // 2, np.float32),
        "blocks": {
            "attn_norm": np.ones((L, D), np.float32),
            "mlp_norm": np.ones((L, D), np.float32),
            "wqkv": w(L, D, K, G + 2, H),
            "wo": w(L, K, G, H, D),
            "w_gate_up": w(L, D, 2, F),
            "w_down": w(L, F, D),
        },
    }
    yield "llama-3.2-1b shapes 2L bf16", cfg, state, "bfloat16"  # 8 replicas fit in 23 GiB


def measure(cfg, state, dtype: str, mesh_shape, slots: int, seq: int) -> dict:
    import numpy as np

    from llama_jax import sharding
    from llama_jax.runner import ModelRunner
    from llama_jax.sampling import SamplingParams, SlotSampling
    from llama_jax.weights import DTYPES, build_model

    mesh = None if mesh_shape is None else sharding.make_mesh("data={},model={}".format(*mesh_shape))
    model = build_model(cfg, state, DTYPES[dtype], place=None if mesh is None else sharding.placer(mesh))
    runner = ModelRunner(model, slots, seq, mesh=mesh)
    st = runner.init_state()
    row = SlotSampling.from_params([SamplingParams(temperature=0.0)], [0])
    t = time.perf_counter()
    st, out = runner.prefill(st, np.arange(1, 17, dtype=np.int32), 0, 0, row)
    out.block_until_ready()
    prefill_s = time.perf_counter() - t
    active = np.ones(slots, bool)
    t = time.perf_counter()
    lowered = runner._decode.lower(runner._leaves, st, active, runner.no_mask, context=seq, batch=slots)
    compiled = lowered.compile()
    decode_s = time.perf_counter() - t
    st, out = runner.decode(st, active, seq)  # the same shapes: no compile
    out.block_until_ready()
    t = time.perf_counter()
    for _ in range(3):
        st, out = runner.decode(st, active, seq)
        np.asarray(out)
    step_ms = (time.perf_counter() - t) / 3 * 1e3
    return {
        "compile_decode_s": decode_s,
        "first_prefill_s": prefill_s,
        "step_ms": step_ms,
        "collectives": collectives(compiled.as_text(), cfg.n_layers),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args()
    if "jax" in sys.modules:
        raise SystemExit("run as a script: the device count is fixed when JAX starts")
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")
    import jax

    print(f"backend {jax.default_backend()}, {jax.device_count()} devices ({jax.devices()[0].device_kind})")
    print(f"decode: {args.slots} slots, context {args.seq}")
    print("collectives in the compiled decode step: per layer (in the layer scan) + outside the layers")
    header = (
        f"{'model':<30} {'mesh':<9} {'compile decode':>14} {'1st prefill':>11} {'step ms':>8}  "
        f"{'per layer':<22} {'outside':<40} per step"
    )
    print(header)
    print("-" * len(header))

    def fmt(c: Counter) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "-"

    for name, cfg, state, dtype in models():
        for shape in MESHES:
            r = measure(cfg, state, dtype, shape, args.slots, args.seq)
            mesh = "1 device" if shape is None else "{}x{}".format(*shape)
            layer, outside = r["collectives"]
            total = cfg.n_layers * sum(layer.values()) + sum(outside.values())
            print(
                f"{name:<30} {mesh:<9} {r['compile_decode_s']:>13.2f}s {r['first_prefill_s']:>10.2f}s "
                f"{r['step_ms']:>8.1f}  {fmt(layer):<22} {fmt(outside):<40} {total}"
            )


if __name__ == "__main__":
    main()

"""Real model sizes: load time, peak memory and decode speed of `llama-jax serve` against llama.cpp's
`llama-server` on the same random-weight GGUF files with real shapes, in one run.

    python bench/bench_scale.py [--models smollm2-1.7b,llama-3.2-1b,llama-3-8b,default] [--formats Q4_0]
                                [--streams 1,8] [--max-tokens 64] [--slots 8] [--ctx 1024]
                                [--llama-server PATH] [--skip-peer]

For each model shape (SmolLM2-1.7B: 24 layers, dim 2048, 32/32 heads, ffn 8192; Llama-3.2-1B:
16 layers, dim 2048, 32/8 heads, ffn 8192; Llama-3-8B: 32 layers, dim 4096, 32/8 heads, ffn
14336; all with the default model's tokenizer and vocabulary; `default`: the default model's
own Q4_1 file, real weights) and format, a GGUF is written
once under `--cache` with the `gguf` package's writer: 4-bit tensors as random blocks (random
codes, scales of a trained model's size: what quantizing random weights gives, without
minutes of quantizing), other types through the package's quantizers. Both servers then
serve it with the same slots and context, one after the other, each measured for:

- load: process start to `/health` 200 (ours with `--no-warmup`: compiles happen during two
  unmeasured warm-up rounds of requests per level, as llama.cpp has none);
- peak RSS of the whole server process (VmHWM) at the end;
- decode tokens/s at 1 and 8 concurrent streams (`--max-tokens` tokens each, ignore_eos,
  temperature 0.7), through `bench_http.py`'s client.

The text is gibberish (random weights); speed and memory are real. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_http import free_port, level, stop_group, tail  # noqa: E402

SHAPES = {  # layers, dim, heads, kv heads, ffn
    "smollm2-1.7b": (24, 2048, 32, 32, 8192),
    "llama-3.2-1b": (16, 2048, 32, 8, 8192),
    "llama-3-8b": (32, 4096, 32, 8, 14336),
}


def write_gguf(path: Path, shape: tuple[int, ...], fmt: str) -> None:
    """A random-weight GGUF of `shape` in `fmt` (Q4_0, Q4_1, Q8_0, F16), with the default
    model's tokenizer metadata."""
    import gguf

    from llama_jax.gguf import GGUFFile
    from llama_jax.weights import resolve_model_path

    L, D, N, K, F = shape
    H = D // N
    meta = GGUFFile(resolve_model_path(None)[1]).metadata
    vocab = len(meta["tokenizer.ggml.tokens"])
    tmp = path.with_suffix(".tmp")  # written whole, then renamed: an interrupted run leaves no half file
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_context_length(4096)
    w.add_embedding_length(D)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(N)
    w.add_head_count_kv(K)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    for key, value in meta.items():
        if key.startswith("tokenizer."):
            if key == "tokenizer.ggml.model":
                w.add_tokenizer_model(value)
            elif isinstance(value, list):
                w.add_array(key, value)
            elif isinstance(value, str):
                w.add_string(key, value)
            elif isinstance(value, bool):
                w.add_bool(key, value)
            elif isinstance(value, int):
                w.add_uint32(key, value)
    rng = np.random.default_rng(0)
    qt = gguf.GGMLQuantizationType[fmt]

    def matrix(name: str, rows: int, cols: int) -> None:
        if fmt in ("Q4_0", "Q4_1"):
            block, size = gguf.GGML_QUANT_SIZES[qt]
            nb = cols // block
            raw = rng.integers(0, 256, (rows, nb, size), dtype=np.uint8)
            d = rng.uniform(0.002, 0.004, (rows, nb)).astype(np.float16)
            raw[..., 0:2] = d.view(np.uint8).reshape(rows, nb, 2)
            if fmt == "Q4_1":
                raw[..., 2:4] = (
                    (d.astype(np.float32) * -8).astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
                )
            w.add_tensor(name, raw.reshape(rows, nb * size), raw_dtype=qt)
        else:
            x = (rng.standard_normal((rows, cols), np.float32) * 0.02).astype(np.float32)
            w.add_tensor(name, gguf.quants.quantize(x, qt), raw_dtype=qt)

    def vector(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, np.float32))

    matrix("token_embd.weight", vocab, D)
    vector("output_norm.weight", D)
    for i in range(L):
        vector(f"blk.{i}.attn_norm.weight", D)
        vector(f"blk.{i}.ffn_norm.weight", D)
        matrix(f"blk.{i}.attn_q.weight", N * H, D)
        matrix(f"blk.{i}.attn_k.weight", K * H, D)
        matrix(f"blk.{i}.attn_v.weight", K * H, D)
        matrix(f"blk.{i}.attn_output.weight", D, N * H)
        matrix(f"blk.{i}.ffn_gate.weight", F, D)
        matrix(f"blk.{i}.ffn_up.weight", F, D)
        matrix(f"blk.{i}.ffn_down.weight", D, F)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    os.replace(tmp, path)


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def server(cmd: list[str], port: int, timeout: float):
    log = tempfile.NamedTemporaryFile("w", prefix="bench_scale_", suffix=".log", delete=False)
    print(f"starting: {shlex.join(cmd)}  (log: {log.name})", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{tail(log.name)}")
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"not healthy after {timeout:.0f} s:\n{tail(log.name)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.25)
        yield proc, time.perf_counter() - t0
    finally:
        stop_group(proc)


async def measure(port: int, streams: list[int], max_tokens: int) -> dict[int, float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key="x", base_url=f"http://127.0.0.1:{port}/v1", timeout=3600, max_retries=0)
    model = (await client.models.list()).data[0].id
    args = SimpleNamespace(model=model, seed=0, top_p=None, temperature=0.7)
    out = {}
    for n in streams:
        # Warm-up, unmeasured: a short round (the prompts' first prefill) and a full one (the
        # prompts again, now from the prefix cache, and decoding at this batch): whatever
        # shapes the measured round meets are compiled (ours, started with --no-warmup).
        await level(client, args, n, 8, 1)
        await level(client, args, n, max_tokens, 1)
        for attempt in range(3):  # llama-server's HTTP layer now and then resets a connection
            r = await level(client, args, n, max_tokens, 1)
            if not r["errors"]:
                break
            print(
                f"{n} streams, attempt {attempt + 1}: {r['errors']} errors: {r['error_samples']}", flush=True
            )
        else:
            raise RuntimeError(f"{r['errors']} errors: {r['error_samples']}")
        out[n] = r["tok_s"]
    await client.close()
    return out


def run_one(cmd: list[str], port: int, args) -> dict:
    with server(cmd, port, args.start_timeout) as (proc, load):
        speeds = asyncio.run(measure(port, args.streams, args.max_tokens))
        rss = peak_rss_mb(proc.pid)
    out = {"load": load, "rss": rss, **{f"tok_s_{n}": v for n, v in speeds.items()}}
    print(out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-1.7b")
    ap.add_argument("--formats", default="Q4_0")
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=1024, help="positions per slot")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/llama-jax/bench-scale"))
    ap.add_argument(
        "--llama-server", default=None, help="llama.cpp's llama-server (default: llama-cpp-peer.sh)"
    )
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--serve-args", default="", help="extra llama-jax serve arguments")
    ap.add_argument("--start-timeout", type=float, default=1800)
    args = ap.parse_args()
    args.streams = [int(s) for s in args.streams.split(",")]
    peer = args.llama_server
    if not args.skip_peer and peer is None:
        script = Path(__file__).resolve().parents[2] / "shared" / "tools" / "llama-cpp-peer.sh"
        peer = subprocess.run(
            ["bash", str(script)], capture_output=True, text=True, check=True
        ).stdout.strip()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models.split(","):
        for fmt in args.formats.split(","):
            if model == "default":  # the default model's own file (SmolLM2-135M-Instruct, Q4_1)
                from llama_jax.weights import resolve_model_path

                path, fmt = resolve_model_path(None)[1], "Q4_1"
            else:
                path = cache / f"{model}-{fmt}.gguf"
            if not path.exists():
                t0 = time.perf_counter()
                write_gguf(path, SHAPES[model], fmt)
                print(
                    f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s"
                )
            size = path.stat().st_size / 1e9
            port = free_port()
            exe = Path(sys.executable).parent / "llama-jax"
            ours = [str(exe), "serve", "--model", str(path), "--host", "127.0.0.1", "--port", str(port)]
            ours += ["--max-slots", str(args.slots), "--max-seq-len", str(args.ctx), "--no-warmup"]
            ours += shlex.split(args.serve_args)
            result = {"llama-jax": run_one(ours, port, args)}
            if peer:
                port = free_port()
                theirs = [peer, "-m", str(path), "--host", "127.0.0.1", "--port", str(port), "-t", "2"]
                theirs += ["-np", str(args.slots), "-c", str(args.slots * args.ctx)]
                result["llama.cpp"] = run_one(theirs, port, args)
            rows.append((model, fmt, size, result))
    cols = ["load s", "peak RSS MB"] + [f"tok/s @{n}" for n in args.streams]
    print()
    print(f"| model | format | file GB | server | {' | '.join(cols)} |")
    print("|---" * (4 + len(cols)) + "|")
    for model, fmt, size, result in rows:
        for who, r in result.items():
            vals = [f"{r['load']:.1f}", f"{r['rss']:.0f}"] + [f"{r[f'tok_s_{n}']:.1f}" for n in args.streams]
            print(f"| {model} | {fmt} | {size:.2f} | {who} | {' | '.join(vals)} |")
        if "llama.cpp" in result:
            a, b = result["llama-jax"], result["llama.cpp"]
            ratio = [f"{a['load'] / b['load']:.2f}x", f"{a['rss'] / b['rss']:.2f}x"]
            ratio += [f"{a[f'tok_s_{n}'] / b[f'tok_s_{n}']:.2f}x" for n in args.streams]
            print(f"| {model} | {fmt} | | ratio | {' | '.join(ratio)} |")


if __name__ == "__main__":
    main()

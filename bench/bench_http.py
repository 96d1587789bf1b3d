"""HTTP load test of any OpenAI-compatible server: concurrent streamed chat completions.

    python bench/bench_http.py [--base-url http://127.0.0.1:8080/v1] [--model M] [--concurrency 1,4,16]
                               [--max-tokens 128] [--requests-per-client 1] [--start [--quantize int8]]

The HTTP twin of bench_engine.py: the same prompts, sampling (temperature 0.7, seed 0,
ignore_eos) and metric definitions, so the two tables compare directly. For each concurrency
level, that many clients each stream `--requests-per-client` chat completions one after the
other through the official `openai` client (`stream_options.include_usage`, `ignore_eos` so every
request generates exactly `--max-tokens` tokens). tokens/s is the completion tokens of the usage
chunks over the level's wall time; TTFT is request sent to first content chunk; ITL the gaps
between content chunks; E2E request sent to end of stream. Errors (exceptions, non-200, a
stream without content) are counted, not timed. Works against llama.cpp's and vLLM's servers.

Warm-up before measuring: one 8-token request, then per level a round of 8-token requests at
that concurrency (`--warmup short`, default), or a full unmeasured round per level (`full`:
for a server that compiles shapes on first use, e.g. `llama-jax serve --no-warmup`).

`--start` runs `llama-jax serve` itself on a free port (`--max-slots` the largest level,
`--max-seq-len 512` as bench_engine; `--serve-model`, `--quantize`, `--dtype`, `--serve-args`
pass through), waits for `GET /health` to answer 200 and stops it (SIGTERM) at the end.
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

PROMPTS = [  # bench_engine.py's
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten year old.",
    "List some good habits for writing maintainable Python code, with a sentence on each.",
    "Describe the water cycle in detail.",
]
WARMUP_TOKENS = 8


@dataclasses.dataclass
class Result:
    ok: bool = False
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = dataclasses.field(default_factory=list)
    tokens: int = 0  # completion tokens (the usage chunk's, else content chunks)
    usage: bool = False  # the server sent a usage chunk
    error: str | None = None


async def one(client, args, prompt: str, max_tokens: int) -> Result:
    res = Result()
    extra: dict = {"ignore_eos": True}
    kwargs: dict = {}
    if args.seed is not None:
        kwargs["seed"] = args.seed
    if args.top_p is not None:
        kwargs["top_p"] = args.top_p
    stamps: list[float] = []
    t0 = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=args.model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=args.temperature,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
            **kwargs,
        )
        async with stream:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    stamps.append(time.perf_counter())
                if chunk.usage is not None:
                    res.tokens = chunk.usage.completion_tokens
                    res.usage = True
    except Exception as e:  # noqa: BLE001 - every failure is counted and reported, none stops the run
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e = time.perf_counter() - t0
    if not stamps:
        res.error = "stream ended without content"
        return res
    res.ok = True
    res.ttft = stamps[0] - t0
    res.itl = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    if not res.usage:
        res.tokens = len(stamps)
    return res


async def level(client, args, n: int, max_tokens: int, per_client: int) -> dict:
    async def worker(i: int) -> list[Result]:
        out = []
        for j in range(per_client):
            out.append(await one(client, args, PROMPTS[(i + j * n) % len(PROMPTS)], max_tokens))
        return out

    t0 = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(worker(i) for i in range(n))) for r in rs]
    wall = time.perf_counter() - t0
    good = [r for r in results if r.ok]

    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(xs, q)) if xs else float("nan")

    ttft = [r.ttft for r in good]
    itl = [x for r in good for x in r.itl]
    e2e = [r.e2e for r in good]
    tokens = sum(r.tokens for r in good)
    return {
        "streams": n,
        "requests": len(results),
        "errors": len(results) - len(good),
        "error_samples": sorted({r.error for r in results if r.error}),
        "no_usage": sum(not r.usage for r in good),
        "short": sum(r.usage and r.tokens != max_tokens for r in good),
        "tokens": tokens,
        "wall": wall,
        "tok_s": tokens / wall,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "itl_p50": pct(itl, 50),
        "itl_p99": pct(itl, 99),
        "e2e_p50": pct(e2e, 50),
        "e2e_p99": pct(e2e, 99),
    }


def ms(x: float) -> str:
    return "-" if x != x else f"{x * 1e3:.0f}"


# -- the server, when --start ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(args, port: int, slots: int) -> list[str]:
    exe = Path(sys.executable).parent / "llama-jax"
    cmd = [str(exe)] if exe.exists() else [shutil.which("llama-jax") or "llama-jax"]
    cmd += ["serve", "--host", "127.0.0.1", "--port", str(port), "--max-slots", str(slots)]
    cmd += ["--max-seq-len", str(args.max_seq_len)]
    if args.serve_model:
        cmd += ["--model", args.serve_model]
    if args.quantize:
        cmd += ["--quantize", args.quantize]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    return cmd + shlex.split(args.serve_args)


def stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """Stop a server started with `start_new_session=True`, and whatever it spawned: SIGTERM to
    its process group, SIGKILL after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tail(path: str, lines: int = 20) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


@contextlib.contextmanager
def started_server(args, slots: int):
    """`llama-jax serve` on a free port; yields its base URL once `/health` is 200."""
    port = args.port or free_port()
    cmd = serve_command(args, port, slots)
    log = tempfile.NamedTemporaryFile("w", prefix="bench_http_serve_", suffix=".log", delete=False)
    print(f"starting: {shlex.join(cmd)}  (log: {log.name})", flush=True)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.perf_counter()
        status = None
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}:\n{tail(log.name)}")
            if time.perf_counter() - t0 > args.start_timeout:
                raise SystemExit(
                    f"the server was not healthy after {args.start_timeout:.0f} s:\n{tail(log.name)}"
                )
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code
            except httpx.HTTPError:
                status = None
            if status == 200:
                break
            time.sleep(1)
        print(f"server healthy after {time.perf_counter() - t0:.1f}s", flush=True)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        if proc.poll() is None:
            stop_group(proc)
        log.close()
        if proc.returncode not in (0, -signal.SIGTERM):
            print(f"server exit status {proc.returncode}; log: {log.name}", file=sys.stderr)
        else:
            os.unlink(log.name)


# -- main -----------------------------------------------------------------------------------------


async def run(args, levels: list[int]) -> None:
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=max(levels) + 8, max_keepalive_connections=max(levels) + 8)
    http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(args.timeout, connect=30))
    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, http_client=http)
    async with client:
        models = await client.models.list()
        ids = [m.id for m in models.data]
        if args.model is None:
            if not ids:
                raise SystemExit(f"{args.base_url}/models lists no model; pass --model")
            args.model = ids[0]
        meta = next((getattr(m, "meta", None) for m in models.data if m.id == args.model), None) or {}
        t = time.perf_counter()
        warm = await level(client, args, 1, WARMUP_TOKENS, 1)  # first-call effects, connection setup
        for n in levels if args.warmup != "none" else []:
            full = args.warmup == "full"
            w = await level(client, args, n, args.max_tokens if full else WARMUP_TOKENS, 1)
            warm["errors"] += w["errors"]
            warm["error_samples"] += w["error_samples"]
        server = f" server_dtype={meta.get('dtype')} server_quantize={meta.get('quantize')}" if meta else ""
        print(
            f"base_url={args.base_url} model={args.model}{server} max_tokens={args.max_tokens} "
            f"requests/client={args.requests_per_client} warmup={args.warmup} ({time.perf_counter() - t:.1f}s)"
        )
        if warm["errors"]:
            print(f"warm-up errors: {warm['errors']} ({'; '.join(sorted(set(warm['error_samples'])))})")
        print(
            "| streams | requests | errors | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
            "| E2E p50 ms | E2E p99 ms |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        notes = []
        for n in levels:
            r = await level(client, args, n, args.max_tokens, args.requests_per_client)
            print(
                f"| {n} | {r['requests']} | {r['errors']} | {r['tok_s']:.1f} | {ms(r['ttft_p50'])} | "
                f"{ms(r['ttft_p99'])} | {ms(r['itl_p50'])} | {ms(r['itl_p99'])} | {ms(r['e2e_p50'])} | "
                f"{ms(r['e2e_p99'])} |",
                flush=True,
            )
            for e in r["error_samples"]:
                notes.append(f"streams={n}: error: {e[:300]}")
            if r["no_usage"]:
                notes.append(
                    f"streams={n}: {r['no_usage']} streams had no usage chunk (counted content chunks)"
                )
            if r["short"]:
                notes.append(
                    f"streams={n}: {r['short']} requests generated != {args.max_tokens} tokens "
                    "(ignore_eos not honoured?)"
                )
        for line in notes:
            print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--model", default=None, help="default: the first id of GET {base-url}/models")
    ap.add_argument("--api-key", default="not-needed")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated stream counts")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per request (ignore_eos)")
    ap.add_argument("--requests-per-client", type=int, default=1, help="sequential requests per stream")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0, help="negative: send no seed")
    ap.add_argument("--warmup", choices=("short", "full", "none"), default="short")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--start", action="store_true", help="run `llama-jax serve` for the benchmark")
    ap.add_argument("--port", type=int, default=None, help="--start: port (default: a free one)")
    ap.add_argument("--serve-model", default=None, help="--start: the server's --model")
    ap.add_argument("--quantize", default=None, help="--start: e.g. int8")
    ap.add_argument("--dtype", default=None, help="--start: float32, bfloat16, float16")
    ap.add_argument("--max-seq-len", type=int, default=512, help="--start: tokens per sequence")
    ap.add_argument("--serve-args", default="", help="--start: more `llama-jax serve` options, one string")
    ap.add_argument("--start-timeout", type=float, default=1200.0, help="--start: seconds to wait for health")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    if args.seed is not None and args.seed < 0:
        args.seed = None
    with contextlib.ExitStack() as stack:
        if args.start:
            args.base_url = stack.enter_context(started_server(args, max(levels)))
        try:
            asyncio.run(run(args, levels))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)


if __name__ == "__main__":
    main()

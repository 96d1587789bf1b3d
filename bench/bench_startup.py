"""Start-up: process start to a first streamed token, `llama-jax serve` cold and warm, against
llama.cpp's `llama-server` on the same GGUF file in the same run.

    python bench/bench_startup.py [--model PATH] [--runs cold,warm,warm-full] [--cold-full]
                                  [--llama-server PATH] [--skip-peer] [--max-slots 8] [--max-seq-len 2048]

Each run spawns a fresh server process and measures, from the moment it is spawned:

- ready: the port answers HTTP (any status; ours says `loading` while it loads and compiles);
- health: `/health` is 200;
- first token: the first streamed content token of a short chat ("What is the capital of
  France?", sent as soon as `/health` is 200);
- compiles: for ours, the step shapes compiled (or read from the compilation cache) before
  that token, counted from the server's log, and the shapes still to compile at `/health` ok.

`cold`: empty caches (a fresh `XDG_CACHE_HOME`: no compilation cache, no CPU-kernel build);
`warm`: the same caches again, now filled; `-full` runs use `--warmup full` (every shape before
`/health` ok, today's default before serve-early). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_http import free_port, stop_group, tail  # noqa: E402

PROMPT = "What is the capital of France?"


def peer_path(arg: str | None) -> str:
    if arg:
        return arg
    script = Path(__file__).resolve().parents[2] / "shared" / "tools" / "llama-cpp-peer.sh"
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True).stdout.strip()


def first_token(url: str, model: str | None, timeout: float) -> str:
    """Stream a short chat; return the first content delta (at its arrival)."""
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 16,
        "temperature": 0,
        "stream": True,
    }
    if model:
        body["model"] = model
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            text = (choices[0].get("delta") or {}).get("content")
            if text:
                return text
    raise RuntimeError("the stream ended without a content token")


def run_one(name: str, cmd: list[str], env: dict, port: int, timeout: float, model: str | None) -> dict:
    log = tempfile.NamedTemporaryFile("w", prefix="bench_startup_", suffix=".log", delete=False)
    print(f"{name}: {shlex.join(cmd)}  (log: {log.name})", flush=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    out: dict = {"name": name}
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail(log.name)}")
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"{name} not healthy after {timeout:.0f} s:\n{tail(log.name)}")
            try:
                r = httpx.get(url + "/health", timeout=5)
            except httpx.HTTPError:
                time.sleep(0.1)
                continue
            out.setdefault("ready", time.perf_counter() - t0)
            if r.status_code == 200:
                out["health"] = time.perf_counter() - t0
                out["pending"] = r.json().get("compile", {}).get("pending", 0)
                break
            time.sleep(0.1)
        if model is None:
            model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        first_token(url, model, timeout)
        out["first"] = time.perf_counter() - t0
        log.flush()
        text = Path(log.name).read_text(errors="replace")
        out["compiles"] = text.count("llama_jax.compiler: compiled ")
        return out
    finally:
        stop_group(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the default model's)")
    ap.add_argument("--runs", default="cold,warm,warm-full", help="of cold, warm, cold-full, warm-full")
    ap.add_argument(
        "--llama-server", default=None, help="llama.cpp's llama-server (default: llama-cpp-peer.sh)"
    )
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--max-slots", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--serve-args", default="", help="extra llama-jax serve arguments")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    if args.model is None:
        from llama_jax.weights import resolve_model_path

        args.model = str(resolve_model_path(None)[1])
    # `python -m` rather than the `llama-jax` script: the same code this script imports.
    ours = [sys.executable, "-m", "llama_jax.cli"]
    ours += ["serve", "--model", args.model, "--max-slots", str(args.max_slots)]
    ours += ["--max-seq-len", str(args.max_seq_len), "--no-webui", *shlex.split(args.serve_args)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("LLAMA_JAX_COMPILATION_CACHE", "LLAMA_JAX_KERNEL_CACHE")
        }
        cache = None
        for i, run in enumerate(args.runs.split(",")):
            temp, _, mode = run.partition("-")
            if temp == "cold" or cache is None:  # warm runs use the caches the last run filled
                cache = Path(tmp) / f"cache-{i}"
            env_run = {**env, "XDG_CACHE_HOME": str(cache)}
            port = free_port()
            # A bare --warmup is "full" (and is what servers before warm-up modes took).
            warmup = ["--warmup"] if mode == "full" else ["--warmup", mode or "first"]
            cmd = [*ours, "--host", "127.0.0.1", "--port", str(port), *warmup]
            rows.append(run_one(f"llama-jax {run}", cmd, env_run, port, args.timeout, None))
            print(rows[-1], flush=True)
        if not args.skip_peer:
            port = free_port()
            peer = [
                peer_path(args.llama_server),
                "-m",
                args.model,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
            peer += ["-t", "2", "-np", str(args.max_slots), "-c", str(args.max_slots * args.max_seq_len)]
            rows.append(run_one("llama.cpp llama-server", peer, dict(os.environ), port, args.timeout, None))
            print(rows[-1], flush=True)
    print()
    print(
        "| server | ready s | /health ok s | first token s | step compiles before first token | compiles left at ok |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        ours_only = r["name"].startswith("llama-jax")
        compiles = str(r["compiles"]) if ours_only else "-"
        pending = str(r["pending"]) if ours_only else "-"
        print(
            f"| {r['name']} | {r['ready']:.1f} | {r['health']:.1f} | {r['first']:.1f} | {compiles} | {pending} |"
        )


if __name__ == "__main__":
    main()

"""Engine benchmark through the async API: concurrent streams of generated tokens.

    python bench/bench_engine.py [--model M] [--quantize auto|none|int8|q4] [--streams 1,4,16] [--tokens 128]
                                 [--constrained] [--no-kernels] [--unique]

For each concurrency level, that many asyncio tasks each stream one request of `--tokens`
tokens (ignore_eos, temperature 0.7) at the same time, cycling through four chat prompts
(`--unique`: every stream's message differs, so only the chat template's system prompt is
shared between them). The table reports aggregate tokens/s, time to first token and
inter-token latency percentiles. The engine is warmed up first, so no compile is timed. Not
a test: numbers depend on the machine.

`--constrained` adds, after each level, the same level under a JSON schema (an object holding
an array of at least 100 strings, so every stream generates `--tokens` tokens), with the
grammar mask time per constrained token from the engine's metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten year old.",
    "List some good habits for writing maintainable Python code, with a sentence on each.",
    "Describe the water cycle in detail.",
]


async def one(gen, prompt, sampling, **request):
    t0 = time.perf_counter()
    stamps = []
    async for d in gen.astream(prompt, sampling, **request):
        if d.token_ids:
            stamps.append(time.perf_counter())
    return t0, stamps


async def level(gen, n, sampling, request, unique=False):
    def message(i):
        return (f"Request {i}: " if unique else "") + PROMPTS[i % len(PROMPTS)]

    prompts = [gen.encode_chat([{"role": "user", "content": message(i)}]) for i in range(n)]
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(gen, p, sampling, **request) for p in prompts))
    wall = time.perf_counter() - t0
    ttft = [s[0] - t for t, s in results]
    itl = [b - a for _, s in results for a, b in zip(s, s[1:], strict=False)]
    tokens = sum(len(s) for _, s in results)
    return {
        "streams": n,
        "tok_s": tokens / wall,
        "ttft_p50": np.percentile(ttft, 50),
        "ttft_p99": np.percentile(ttft, 99),
        "itl_p50": np.percentile(itl, 50),
        "itl_p99": np.percentile(itl, 99),
        "tokens": tokens,
    }


# Long enough that no stream completes it within --tokens: every stream runs to the limit, as
# the unconstrained ones do (ignore_eos), so both rows do the same work.
SCHEMA = {
    "type": "object",
    "properties": {"lines": {"type": "array", "items": {"type": "string"}, "minItems": 100}},
    "required": ["lines"],
}


def main() -> None:
    from llama_jax import Generator, SamplingParams
    from llama_jax.constrain import Grammar

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--quantize", default="auto", help="auto (the file's precision), none, int8 or q4")
    ap.add_argument("--streams", default="1,4,16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--constrained", action="store_true")
    ap.add_argument(
        "--unique",
        action="store_true",
        help="a different user message per stream (only the chat template's system prompt is shared)",
    )
    ap.add_argument("--no-kernels", action="store_true", help="XLA's own ops instead of the CPU kernels")
    args = ap.parse_args()
    levels = [int(x) for x in args.streams.split(",")]
    gen = Generator.from_pretrained(
        args.model,
        quantize=args.quantize,
        max_slots=max(levels),
        max_seq_len=512,
        kernels=False if args.no_kernels else None,
    )
    t = time.perf_counter()
    gen.warmup(progress=False)
    print(
        f"model={gen.loaded.name} quantize={args.quantize} kernels={gen.loaded.model.kernels}"
        f" slots={max(levels)} warmup={time.perf_counter() - t:.1f}s"
    )
    sampling = SamplingParams(temperature=0.7, seed=0)
    # First-call effects, on a message of its own: the measured prompts are not in the cache.
    warm = gen.encode_chat([{"role": "user", "content": "Say hello."}])
    asyncio.run(one(gen, warm, SamplingParams(), max_tokens=8, ignore_eos=True))
    grammars = [None, Grammar.json_schema(SCHEMA)] if args.constrained else [None]
    print(
        "| streams | grammar | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | mask us/token |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in levels:
        for grammar in grammars:
            request = {"max_tokens": args.tokens, "ignore_eos": True, "grammar": grammar}
            before = gen.metrics()
            r = asyncio.run(level(gen, n, sampling, request, args.unique))
            after = gen.metrics()
            masked = after["constrained_tokens"] - before["constrained_tokens"]
            mask_us = (after["grammar_mask_seconds"] - before["grammar_mask_seconds"]) / max(masked, 1) * 1e6
            print(
                f"| {n} | {'json_schema' if grammar else '-'} | {r['tok_s']:.1f} | "
                f"{r['ttft_p50'] * 1e3:.0f} | {r['ttft_p99'] * 1e3:.0f} | "
                f"{r['itl_p50'] * 1e3:.0f} | {r['itl_p99'] * 1e3:.0f} | {mask_us:.0f} |"
            )
    gen.close()


if __name__ == "__main__":
    main()

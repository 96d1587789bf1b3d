"""The `llama-jax` command: `chat` (one prompt, or an interactive session) and `generate`;
`serve` (the OpenAI-compatible server) is `serve/cli.py`'s, imported only when that command
runs. The model-load flags of every command are made from `LoadOptions`' fields.

llama-jax chat "What is the capital of France?"
llama-jax chat                      # interactive; /reset clears the history, /exit quits
llama-jax generate "Once upon a time" --max-tokens 64
llama-jax serve --port 8080         # OpenAI API on http://127.0.0.1:8080/v1
llama-jax serve model.gguf -c 4096 -np 4   # llama.cpp's spellings (vLLM's too: --max-model-len ...)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence

from llama_jax import __version__
from llama_jax.errors import LlamaJaxError
from llama_jax.weights import LoadOptions

# What `serve/cli.py` (the `serve` command) shares with the other commands.
__all__ = ["MODEL_HELP", "THREADS_HELP", "load_flags", "load_options", "main", "run_command"]

log = logging.getLogger("llama_jax.cli")

MODEL_HELP = (
    "alias, GGUF file, Hugging Face folder or Hugging Face model id (org/name, org/name:Q4_K_M for "
    "a GGUF repository's file); default: smollm2-135m-instruct"
)
THREADS_HELP = (
    "CPU threads: sets PJRT_NPROC (XLA:CPU's thread pools) and LLAMA_JAX_CPU_THREADS (the CPU decode "
    "kernels' pool) before JAX starts (default: every CPU this process may use)"
)
SERVE_HELP = "serve the OpenAI HTTP API (chat, completions, embeddings)"


def load_flags(group, names: Sequence[str], given_only: bool = False) -> None:
    """Add the flags of `LoadOptions`' fields `names` (in that order) to `group`, spelled and
    explained by the fields' metadata. The flags default to the fields' defaults, or with
    `given_only` to None, so that only the flags given count (the server lays them over its
    other settings); the help names the default either way."""
    fields = {f.name: f for f in dataclasses.fields(LoadOptions)}
    for name in names:
        f = fields[name]
        meta = dict(f.metadata)
        text, flags = meta.pop("help"), meta.pop("flags")
        if f.default is not None:
            text += f" (default: {f.default})"
        group.add_argument(*flags, dest=name, default=None if given_only else f.default, help=text, **meta)


def load_options(args: argparse.Namespace) -> dict:
    """The load options given as flags (`load_flags`), by field name."""
    names = (f.name for f in dataclasses.fields(LoadOptions))
    return {k: v for k in names if (v := getattr(args, k, None)) is not None}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "-hf", "--model", "--hf-repo", default=None, help=MODEL_HELP)
    load_flags(p, ("revision", "dtype", "quantize", "mesh", "max_seq_len"))
    p.add_argument("-t", "--threads", type=int, metavar="N", default=None, help=THREADS_HELP)
    _sampling_flags(p)
    p.add_argument("--system", default=None, help="system message (chat)")
    p.add_argument("-v", "--verbose", action="store_true")


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    """A flag per sampling field (`sampling.FIELDS`: its default, range and help), and --max-tokens."""
    from llama_jax.sampling import FIELDS
    from llama_jax.stopping import DEFAULT_MAX_TOKENS

    for name, knob in FIELDS.items():
        if knob.flag:
            shown = "none" if knob.default is None else knob.default
            p.add_argument(
                "--" + name.replace("_", "-"),
                type=knob.type,
                default=knob.default,
                help=f"{knob.description} Range {knob.range_text()}; default {shown}.".replace("%", "%%"),
            )
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="the most tokens to generate")


def _sampling(args):
    """(SamplingParams, StopRules keywords) from the parsed flags."""
    from llama_jax.sampling import FIELDS, SamplingParams

    params = SamplingParams(**{n: getattr(args, n) for n, knob in FIELDS.items() if knob.flag})
    return params, {"max_tokens": args.max_tokens}


def _load(args):
    from llama_jax.generator import Generator

    return Generator.from_pretrained(args.model, LoadOptions.of(**load_options(args), max_slots=1))


def _print_stream(chunks) -> None:
    for piece in chunks:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(args) -> None:
    gen = _load(args)
    sampling, stop = _sampling(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt:
        _print_stream(gen.chat_stream(history + [{"role": "user", "content": args.prompt}], sampling, **stop))
        return
    print(
        f"Chatting with {gen.loaded.name}. /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr
    )
    start = list(history)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = list(start)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        pieces = []
        try:
            for piece in gen.chat_stream(history, sampling, **stop):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        except LlamaJaxError as e:
            history.pop()
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(pieces)})


def cmd_generate(args) -> None:
    gen = _load(args)
    sampling, stop = _sampling(args)
    _print_stream(gen.stream(args.prompt, sampling, **stop))


def use_threads(n: int) -> None:
    """Bound this process's CPU threads before JAX starts its CPU client: XLA:CPU sizes its
    thread pools from PJRT_NPROC, the CPU decode kernels theirs from LLAMA_JAX_CPU_THREADS."""
    if n < 1:
        raise LlamaJaxError("--threads must be at least 1")
    os.environ["PJRT_NPROC"] = os.environ["LLAMA_JAX_CPU_THREADS"] = str(n)


def run_command(func: Callable[[argparse.Namespace], None], args: argparse.Namespace, level: int) -> int:
    """Run a parsed command: logging at `level` (INFO with `--verbose`), `--threads` before
    JAX starts, and a library error as one line on stderr with exit status 1."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.threads is not None:
            use_threads(args.threads)
        func(args)
    except LlamaJaxError as e:
        print(f"llama-jax: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from serve.cli import main as serve_main

        return serve_main(argv[1:])
    parser = argparse.ArgumentParser(prog="llama-jax", description="Llama-family models on JAX/XLA")
    parser.add_argument("--version", action="version", version=f"llama-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("chat", help="chat with a model (interactive when no prompt is given)")
    p.add_argument("prompt", nargs="?", default=None)
    _common(p)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("generate", help="complete a raw text prompt")
    p.add_argument("prompt")
    _common(p)
    p.set_defaults(func=cmd_generate)
    sub.add_parser("serve", help=SERVE_HELP, add_help=False)  # listed here; its flags are serve/cli.py's
    args = parser.parse_args(argv)
    return run_command(args.func, args, logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())

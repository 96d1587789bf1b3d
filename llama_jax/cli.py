"""The `llama-jax` command: `chat` (one prompt, or an interactive session), `generate` and
`serve` (the OpenAI-compatible server; the only place this package imports `serve`).

llama-jax chat "What is the capital of France?"
llama-jax chat                      # interactive; /reset clears the history, /exit quits
llama-jax generate "Once upon a time" --max-tokens 64
llama-jax serve --port 8080         # OpenAI API on http://127.0.0.1:8080/v1
llama-jax serve model.gguf -c 4096 -np 4   # llama.cpp's spellings (vLLM's too: --max-model-len ...)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from llama_jax import __version__
from llama_jax.errors import LlamaJaxError

log = logging.getLogger("llama_jax.cli")

QUANTIZE_CHOICES = (
    "auto",
    "none",
    "int8",
    "q4",
    "q8",
)  # weights.QUANTIZE_CHOICES, without importing JAX here
QUANTIZE_HELP = (
    "weight format: auto keeps the file's precision (a Q4 GGUF stays 4-bit, Q5-Q8 become 8-bit "
    "groups, float files float); none: float; int8: per-channel int8; q4: 4-bit groups of 32; "
    "q8: 8-bit groups of 32 (default: auto)"
)
MODEL_HELP = (
    "alias, GGUF file, Hugging Face folder or Hugging Face model id (org/name, org/name:Q4_K_M for "
    "a GGUF repository's file); default: smollm2-135m-instruct"
)
THREADS_HELP = (
    "CPU threads: sets PJRT_NPROC (XLA:CPU's thread pools) and LLAMA_JAX_CPU_THREADS (the CPU decode "
    "kernels' pool) before JAX starts (default: every CPU this process may use)"
)
MESH_HELP = (
    "tensor-parallel over devices: data=D,model=M (M devices per replica, D replicas of the slot "
    "batch), or auto (every device on model); default: one device"
)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "-hf", "--model", "--hf-repo", default=None, help=MODEL_HELP)
    p.add_argument("--revision", default=None, help="Hugging Face model id: branch, tag or commit")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: float32 on CPU, bfloat16 on GPU/TPU",
    )
    p.add_argument("--quantize", default="auto", choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)
    p.add_argument("--mesh", default=None, help=MESH_HELP)
    p.add_argument("-c", "--ctx-size", "--max-seq-len", dest="max_seq_len", type=int, default=2048)
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

    return Generator.from_pretrained(
        args.model,
        revision=args.revision,
        dtype=args.dtype,
        quantize=args.quantize,
        max_seq_len=args.max_seq_len,
        max_slots=1,
        mesh=args.mesh,
    )


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


def cmd_serve(args) -> None:
    settings = serve_settings(args)
    distributed = bool(args.coordinator or args.distributed)
    if distributed:
        from llama_jax import sharding

        sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        import jax

        if jax.process_index() != 0:
            _follow(settings)
            return
    from serve.server import run

    try:
        run(settings)
    except (Exception, SystemExit) as e:
        if not distributed:
            raise
        # jax.distributed's exit handler waits for the other processes, which wait for this
        # one: a process 0 that cannot serve (its port taken, say) would hang, not exit.
        code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1
        if not isinstance(e, SystemExit):
            log.exception("process 0 of a multi-host server failed")
        logging.shutdown()
        os._exit(code)


def _follow(settings) -> None:
    """A process other than 0 of a multi-host server: load the same model on the same mesh,
    then replay process 0's device steps (`lockstep.follow`); no HTTP here."""
    from llama_jax import lockstep
    from serve.state import open_generator

    specs = settings.model_specs()
    if len(specs) != 1 or specs[0].lazy:
        raise LlamaJaxError("a multi-host server serves exactly one model, loaded at start")
    lockstep.follow(open_generator(specs[0], settings.compilation_cache).scheduler)


def serve_settings(args):
    """Settings for `llama-jax serve`: the defaults, then the config file (`--config`, else
    `LLAMA_JAX_CONFIG`), then the `LLAMA_JAX_*` variables, then the flags given."""
    from serve.settings import load, read_key_file

    flags = dict(
        host=args.host,
        port=args.port,
        warmup=args.warmup,
        webui=args.webui,
        max_slots=args.max_slots,
        max_seq_len=args.max_seq_len,
        dtype=args.dtype,
        quantize=args.quantize,
        max_queue=args.max_queue,
        chat_template=args.chat_template,
        mesh=args.mesh,
        rate_limit_rpm=args.rate_limit_rpm,
        rate_limit_tpm=args.rate_limit_tpm,
        memory_budget_mb=args.memory_budget_mb,
        model=tuple(filter(None, [args.model_path, *args.model])) or None,
        revision=args.revision,
        aliases=tuple(args.alias + args.served_model_name) or None,
        strict_model_names=args.strict_model_names,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        cors_origins=tuple(args.cors_origin) or None,
        reasoning_format=args.reasoning_format,
    )
    try:
        keys = tuple(args.api_key) + (read_key_file(args.api_key_file) if args.api_key_file else ())
        flags["api_keys"] = keys or None
        return load(args.config, flags={k: v for k, v in flags.items() if v is not None})
    except ValueError as e:
        raise LlamaJaxError(str(e)) from None


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    """`llama-jax serve`'s flags, grouped, with llama.cpp's (`-m -c -np -a -t`) and vLLM's
    (`--served-model-name --max-model-len --max-num-seqs`) spellings of the same settings."""
    from llama_jax.compiler import WARMUP_MODES
    from serve.settings import Settings  # only for the defaults; imports no web framework

    d = Settings()
    g = p.add_argument_group("model")
    g.add_argument("model_path", nargs="?", default=None, metavar="MODEL", help="the model (as --model)")
    g.add_argument(
        "-m",
        "-hf",
        "--model",
        "--hf-repo",
        action="append",
        default=[],
        help=MODEL_HELP + "; repeat to serve several",
    )
    g.add_argument("--revision", default=None, help="Hugging Face model id: branch, tag or commit")
    g.add_argument(
        "-a",
        "--alias",
        action="append",
        default=[],
        help="another name for the model (NAME for the first model, or MODEL_ID=NAME); repeatable",
    )
    g.add_argument(
        "--served-model-name",
        nargs="+",
        default=[],
        metavar="NAME",
        help="vLLM's spelling: names the first model answers to (as --alias)",
    )
    g.add_argument(
        "--strict-model-names",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a single model answers only its own names (default: any name, as llama.cpp)",
    )
    g.add_argument("--chat-template", default=None, help="built-in template name or Jinja source")
    g.add_argument(
        "--config", default=None, help="TOML file of settings and models (variables and flags override it)"
    )
    g = p.add_argument_group("engine")
    g.add_argument(
        "-c",
        "--ctx-size",
        "--max-seq-len",
        "--max-model-len",
        dest="max_seq_len",
        metavar="N",
        type=int,
        default=None,
        help=f"tokens per sequence (default: {d.max_seq_len})",
    )
    g.add_argument(
        "-np",
        "--parallel",
        "--max-slots",
        "--max-num-seqs",
        dest="max_slots",
        metavar="N",
        type=int,
        default=None,
        help=f"sequences decoded together (default: {d.max_slots})",
    )
    g.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto (default): float32 on CPU, bfloat16 on GPU/TPU",
    )
    g.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)
    g.add_argument("-t", "--threads", type=int, metavar="N", default=None, help=THREADS_HELP)
    g.add_argument("--mesh", default=None, help=MESH_HELP)
    g.add_argument(
        "--max-queue", type=int, default=None, help=f"waiting requests before 503 (default: {d.max_queue})"
    )
    g.add_argument(
        "--warmup",
        nargs="?",
        const="full",
        default=None,
        choices=WARMUP_MODES,
        help="first (default): serve once a first request's steps are compiled and compile the rest "
        "in the background; full (also plain --warmup): compile every step shape before /health says ok; "
        "none: compile each step when first needed",
    )
    g.add_argument("--no-warmup", dest="warmup", action="store_const", const="none", help="--warmup none")
    g.add_argument(
        "--memory-budget-mb",
        type=int,
        default=None,
        help="weights + KV caches of loaded models; a load that would not fit is refused (0: off)",
    )
    g = p.add_argument_group("server")
    g.add_argument("--host", default=None, help=f"address to listen on (default: {d.host})")
    g.add_argument("--port", type=int, default=None, help=f"port (default: {d.port})")
    g.add_argument("--ssl-certfile", default=None, help="TLS certificate (PEM): serve https")
    g.add_argument("--ssl-keyfile", default=None, help="TLS private key (PEM) of --ssl-certfile")
    g.add_argument(
        "--cors-origin", action="append", default=[], help="allowed browser origin, or * (default: none)"
    )
    g.add_argument(
        "--webui", action=argparse.BooleanOptionalAction, default=None, help="serve the chat page at /"
    )
    g.add_argument(
        "--reasoning-format",
        default=None,
        choices=("auto", "deepseek", "none"),
        help="a <think> block goes to reasoning_content (auto, deepseek) or stays inline (none)",
    )
    g.add_argument("-v", "--verbose", action="store_true")
    g = p.add_argument_group("security and limits")
    g.add_argument(
        "--api-key", action="append", default=[], help="accepted API key (repeatable); keys turn auth on"
    )
    g.add_argument("--api-key-file", default=None, help="file of API keys, one per line")
    g.add_argument(
        "--rate-limit-rpm", type=int, default=None, help="requests per minute per key or client (0: off)"
    )
    g.add_argument(
        "--rate-limit-tpm", type=int, default=None, help="tokens per minute per key or client (0: off)"
    )
    g = p.add_argument_group("several hosts")
    g.add_argument(
        "--distributed",
        action="store_true",
        help="jax.distributed.initialize() with auto-detected arguments (Cloud TPU)",
    )
    g.add_argument("--coordinator", default=None, help="process 0's HOST:PORT")
    g.add_argument("--num-processes", type=int, default=None, help="how many processes")
    g.add_argument("--process-id", type=int, default=None, help="this process's index")


def use_threads(n: int) -> None:
    """Bound this process's CPU threads before JAX starts its CPU client: XLA:CPU sizes its
    thread pools from PJRT_NPROC, the CPU decode kernels theirs from LLAMA_JAX_CPU_THREADS."""
    if n < 1:
        raise LlamaJaxError("--threads must be at least 1")
    os.environ["PJRT_NPROC"] = os.environ["LLAMA_JAX_CPU_THREADS"] = str(n)


def main(argv: list[str] | None = None) -> int:
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
    p = sub.add_parser("serve", help="serve the OpenAI HTTP API (chat, completions, embeddings)")
    _serve_arguments(p)
    p.add_argument("--version", action="version", version=f"llama-jax {__version__}")
    p.set_defaults(func=cmd_serve)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose or args.command == "serve" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.threads is not None:
            use_threads(args.threads)
        args.func(args)
    except LlamaJaxError as e:
        print(f"llama-jax: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

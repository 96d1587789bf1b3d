"""`llama-jax serve`: its flags and its settings (the defaults, then the config file, then the
`LLAMA_JAX_*` variables, then the flags given: `serve/settings.py`), then the server
(`serve/server.py`), or on a process other than 0 of a multi-host server the lockstep
follower. `llama_jax/cli.py` hands the command here; nothing else imports this module.
"""

from __future__ import annotations

import argparse
import logging
import os

from llama_jax import WARMUP_MODES, LlamaJaxError, __version__, initialize_distributed
from llama_jax.cli import MODEL_HELP, THREADS_HELP, load_flags, load_options, run_command
from serve.settings import REASONING_FORMATS, Settings, load, read_key_file

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    """Run `llama-jax serve` with `argv` (the arguments after `serve`)."""
    parser = argparse.ArgumentParser(
        prog="llama-jax serve", description="serve the OpenAI HTTP API (chat, completions, embeddings)"
    )
    add_arguments(parser)
    parser.add_argument("--version", action="version", version=f"llama-jax {__version__}")
    return run_command(cmd_serve, parser.parse_args(argv), logging.INFO)


def cmd_serve(args: argparse.Namespace) -> None:
    settings = serve_settings(args)
    distributed = bool(args.coordinator or args.distributed)
    if distributed:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
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


def _follow(settings: Settings) -> None:
    """A process other than 0 of a multi-host server: load the same model on the same mesh,
    then replay process 0's device steps (`Generator.follow`); no HTTP here."""
    from serve.state import open_generator

    specs = settings.model_specs()
    if len(specs) != 1 or specs[0].lazy:
        raise LlamaJaxError("a multi-host server serves exactly one model, loaded at start")
    open_generator(specs[0], settings.compilation_cache).follow()


def serve_settings(args: argparse.Namespace) -> Settings:
    """Settings for `llama-jax serve`: the defaults, then the config file (`--config`, else
    `LLAMA_JAX_CONFIG`), then the `LLAMA_JAX_*` variables, then the flags given."""
    flags = dict(
        load_options(args),
        host=args.host,
        port=args.port,
        warmup=args.warmup,
        webui=args.webui,
        max_queue=args.max_queue,
        rate_limit_rpm=args.rate_limit_rpm,
        rate_limit_tpm=args.rate_limit_tpm,
        memory_budget_mb=args.memory_budget_mb,
        model=tuple(filter(None, [args.model_path, *args.model])) or None,
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`llama-jax serve`'s flags, grouped, with llama.cpp's (`-m -c -np -a -t`) and vLLM's
    (`--served-model-name --max-model-len --max-num-seqs`) spellings of the same settings.
    Every flag defaults to None: only the flags given are laid over the other settings."""
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
    load_flags(g, ("revision",), given_only=True)
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
    load_flags(g, ("chat_template",), given_only=True)
    g.add_argument(
        "--config", default=None, help="TOML file of settings and models (variables and flags override it)"
    )
    g = p.add_argument_group("engine")
    load_flags(g, ("max_seq_len", "max_slots", "dtype", "quantize"), given_only=True)
    g.add_argument("-t", "--threads", type=int, metavar="N", default=None, help=THREADS_HELP)
    load_flags(g, ("mesh",), given_only=True)
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
        choices=REASONING_FORMATS,
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

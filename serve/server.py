"""Run the app under hypercorn in this process (what `llama-jax serve` does).

Fails fast on a model that cannot be found, before binding the port; SIGINT/SIGTERM stop
the server gracefully (running streams get `graceful_timeout` seconds, then the engine stops).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from hypercorn.asyncio import serve
from hypercorn.config import Config

from llama_jax import LlamaJaxError, resolve_model_path
from serve.app import OPEN_WARNED, create_app
from serve.auth import reachable, warn_open
from serve.settings import Settings
from serve.state import EXIT_ENGINE_FAILED, ServerState

log = logging.getLogger(__name__)


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.keep_alive_timeout = 75  # longer than common proxies' idle timeouts
    config.graceful_timeout = 10
    config.accesslog = None  # the app writes one line per request itself
    if settings.ssl_certfile or settings.ssl_keyfile:
        if not (settings.ssl_certfile and settings.ssl_keyfile):
            raise LlamaJaxError("https needs both ssl_certfile and ssl_keyfile")
        config.certfile, config.keyfile = settings.ssl_certfile, settings.ssl_keyfile
    return config


def run(settings: Settings) -> None:
    for spec in settings.model_specs():
        resolve_model_path(spec.model, spec.revision)  # a missing model fails here, with its name
    config = hypercorn_config(settings)
    app = create_app(settings)
    if not settings.api_keys and reachable(settings.host):
        warn_open(f"{settings.host}:{settings.port}")
        app.config[OPEN_WARNED] = True

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        state.request_exit = stop.set  # an engine failure stops the server gracefully
        scheme = "https" if config.ssl_enabled else "http"
        log.info("listening on %s://%s:%d", scheme, settings.host, settings.port)
        await serve(app, config, shutdown_trigger=stop.wait)

    state: ServerState = app.extensions["llama_jax"]
    asyncio.run(main())
    if state.failed is not None:
        log.critical("exiting with status %d after an engine failure", EXIT_ENGINE_FAILED)
        sys.exit(EXIT_ENGINE_FAILED)

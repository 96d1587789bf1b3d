"""What the app holds: the settings, the model being loaded or served, and its names.

The model loads (and warms up) on a worker thread after the server starts listening, so
`/health` can answer `loading` meanwhile; generation routes answer 503 until it is ready.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from pathlib import Path

from llama_jax.generator import Generator
from llama_jax.weights import DEFAULT_MODEL
from serve.errors import APIError, model_not_found, unavailable
from serve.settings import Settings

log = logging.getLogger(__name__)


class ServerState:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.model_id = _model_id(settings.model)
        self.names = (self.model_id, *[a for a in settings.aliases if a != self.model_id])
        self.created = int(time.time())
        self.status = "loading"  # loading -> ok | error
        self.error: str | None = None
        self.generator: Generator | None = None
        self.fingerprint = (
            "fp_"
            + hashlib.sha256(f"{self.model_id}:{settings.dtype}:{settings.quantize}".encode()).hexdigest()[
                :10
            ]
        )
        self._task: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        try:
            await asyncio.to_thread(self._load_sync)
        except Exception as e:  # noqa: BLE001 - reported by /health and every route
            self.status, self.error = "error", f"{type(e).__name__}: {e}"
            log.error("the model could not be loaded: %s", self.error)

    def _load_sync(self) -> None:
        s = self.settings
        t0 = time.monotonic()
        gen = Generator.from_pretrained(
            s.model,
            dtype=s.dtype,
            quantize=s.quantize,
            max_seq_len=s.max_seq_len,
            max_slots=s.max_slots,
            max_queue=s.max_queue,
            chat_template=s.chat_template,
            compilation_cache=s.compilation_cache,
        )
        log.info("loaded %s from %s in %.1f s", self.model_id, gen.loaded.path, time.monotonic() - t0)
        if s.warmup:
            t1 = time.monotonic()
            gen.warmup()
            log.info("warm-up compiled every step shape in %.1f s", time.monotonic() - t1)
        self.generator = gen
        self.status = "ok"
        log.info(
            "serving %s (%s) on %d slots of %d tokens",
            ", ".join(self.names),
            s.dtype,
            s.max_slots,
            gen.max_seq_len,
        )

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            await asyncio.shield(self._task)  # a load in progress cannot be interrupted; let it end
        if self.generator is not None:
            await asyncio.to_thread(self.generator.close)

    # -- per request -----------------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise model_not_found(name)

    def ready(self) -> Generator:
        """The generator, or a 503 (loading) / 500 (failed to load, engine stopped)."""
        if self.status == "error":
            raise APIError(500, f"The model failed to load: {self.error}", "server_error")
        if self.generator is None:
            raise unavailable("The model is still loading; retry shortly.")
        loop = self.generator.loop
        if loop.error is not None or not loop.running:
            raise APIError(500, "The inference engine stopped; the server must be restarted.", "server_error")
        return self.generator

    @property
    def healthy(self) -> bool:
        gen = self.generator
        return self.status == "ok" and gen is not None and gen.loop.error is None and gen.loop.running


def _model_id(model: str | None) -> str:
    """The name clients use: an alias as given, a file or folder by its stem."""
    if model is None:
        return DEFAULT_MODEL
    p = Path(model)
    if p.suffix == ".gguf":
        return p.stem
    if p.exists():
        return p.name
    return model

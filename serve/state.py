"""What the app holds: the settings and a registry of served models, each with its own
engine and slots, found by any of its names.

Models load (and warm up) one after the other on a worker thread once the server listens, so
`/health` can answer `loading` meanwhile; a model's routes answer 503 until it is ready.
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
from serve.settings import ModelSpec, Settings

log = logging.getLogger(__name__)


class ModelEntry:
    """One served model: its spec, names, load status and generator."""

    def __init__(self, spec: ModelSpec, model_id: str):
        self.spec = spec
        self.id = model_id
        self.names = (model_id, *[a for a in spec.aliases if a != model_id])
        self.status = "loading"  # loading -> ok | error
        self.error: str | None = None
        self.generator: Generator | None = None
        self.fingerprint = (
            "fp_" + hashlib.sha256(f"{model_id}:{spec.dtype}:{spec.quantize}".encode()).hexdigest()[:10]
        )

    def load(self, warmup: bool, compilation_cache: str | None) -> None:
        s = self.spec
        t0 = time.monotonic()
        try:
            gen = Generator.from_pretrained(
                s.model,
                dtype=s.dtype,
                quantize=s.quantize,
                max_seq_len=s.max_seq_len,
                max_slots=s.max_slots,
                max_queue=s.max_queue,
                chat_template=s.chat_template,
                compilation_cache=compilation_cache,
            )
            log.info("loaded %s from %s in %.1f s", self.id, gen.loaded.path, time.monotonic() - t0)
            if warmup:
                t1 = time.monotonic()
                gen.warmup()
                log.info("%s: warm-up compiled every step shape in %.1f s", self.id, time.monotonic() - t1)
        except Exception as e:  # noqa: BLE001 - reported by /health and the model's routes
            self.status, self.error = "error", f"{type(e).__name__}: {e}"
            log.error("model %s could not be loaded: %s", self.id, self.error)
            return
        self.generator = gen
        self.status = "ok"
        log.info(
            "serving %s (%s%s) on %d slots of %d tokens",
            ", ".join(self.names),
            s.dtype,
            ", int8" if s.quantize else "",
            s.max_slots,
            gen.max_seq_len,
        )

    @property
    def healthy(self) -> bool:
        gen = self.generator
        return self.status == "ok" and gen is not None and gen.loop.error is None and gen.loop.running

    def ready(self) -> Generator:
        """The generator, or a 503 (loading) / 500 (failed to load, engine stopped)."""
        if self.status == "error":
            raise APIError(500, f"The model {self.id} failed to load: {self.error}", "server_error")
        if self.generator is None:
            raise unavailable(f"The model {self.id} is still loading; retry shortly.")
        if not self.healthy:
            raise APIError(500, "The inference engine stopped; the server must be restarted.", "server_error")
        return self.generator


class ServerState:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.created = int(time.time())
        self.models: list[ModelEntry] = []
        self.by_name: dict[str, ModelEntry] = {}
        for spec in settings.model_specs():
            entry = ModelEntry(spec, model_id(spec.model))
            for name in entry.names:
                if name in self.by_name:
                    raise ValueError(f"two models are called {name!r}: give one an alias")
                self.by_name[name] = entry
            self.models.append(entry)
        self.draining = False  # set on shutdown: new generations get 503
        self._task: asyncio.Task | None = None

    @property
    def names(self) -> list[str]:
        return [n for m in self.models for n in m.names]

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._load_all())

    async def _load_all(self) -> None:
        for entry in self.models:
            await asyncio.to_thread(entry.load, self.settings.warmup, self.settings.compilation_cache)

    async def close(self) -> None:
        self.draining = True
        if self._task is not None and not self._task.done():
            self._task.cancel()  # models not started yet stay unloaded; the one loading finishes
        for entry in self.models:
            if entry.generator is not None:
                await asyncio.to_thread(entry.generator.close)

    # -- per request -----------------------------------------------------------------------------

    def get(self, name: str | None) -> ModelEntry:
        """The model called `name` (the first model when None), or a 404."""
        if name is None:
            return self.models[0]
        entry = self.by_name.get(name)
        if entry is None:
            raise model_not_found(name)
        return entry

    def generator(self, name: str | None) -> Generator:
        entry = self.get(name)
        if self.draining:
            raise unavailable("The server is shutting down.", code="server_shutting_down")
        return entry.ready()

    @property
    def healthy(self) -> bool:
        return all(m.healthy for m in self.models)


def model_id(model: str | None) -> str:
    """The name clients use: an alias as given, a file or folder by its stem."""
    if model is None:
        return DEFAULT_MODEL
    p = Path(model)
    if p.suffix == ".gguf":
        return p.stem
    if p.exists():
        return p.name
    return model

"""What the app holds: the settings and a registry of served models, each with its own
engine and slots, found by any of its names.

Models load (and warm up) one after the other on a worker thread once the server listens, so
`/health` can answer `loading` meanwhile; a model's routes answer 503 until it is ready. A
`lazy` model loads on its first request (which waits for it) and, with `idle_unload_s`, is
unloaded again after that long without work. With a memory budget, a load whose estimate
(weights + KV cache) does not fit beside the loaded models is refused with a 503 that says
so, and nothing else is disturbed.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from llama_jax.generator import Generator
from llama_jax.weights import DEFAULT_MODEL, estimate_memory
from serve.errors import APIError, model_not_found, unavailable
from serve.settings import ModelSpec, Settings

log = logging.getLogger(__name__)

EXIT_ENGINE_FAILED = 3  # the process's exit status after an engine failure (docs/troubleshooting.md)
FAILURE_GRACE_S = 3.0  # after a failure: time for the failed requests' errors to reach their clients
FAILURE_DRAIN_S = 10.0  # ... then for other models' running requests to finish


def open_generator(spec: ModelSpec, compilation_cache: str | None) -> Generator:
    """Load the model a spec names, with its engine sized and placed as the spec says."""
    return Generator.from_pretrained(
        spec.model,
        revision=spec.revision,
        dtype=spec.dtype,
        quantize=spec.quantize,
        max_seq_len=spec.max_seq_len,
        max_slots=spec.max_slots,
        max_queue=spec.max_queue,
        chat_template=spec.chat_template,
        compilation_cache=compilation_cache,
        mesh=spec.mesh,
    )


class ModelEntry:
    """One served model: its spec, names, load status and generator."""

    def __init__(self, spec: ModelSpec, model_id: str):
        self.spec = spec
        self.id = model_id
        self.names = (model_id, *[a for a in spec.aliases if a != model_id])
        self.status = "unloaded" if spec.lazy else "loading"  # unloaded -> loading -> ok | error
        self.error: str | None = None
        self.generator: Generator | None = None
        self.last_used = time.monotonic()
        self.lock = asyncio.Lock()  # one load or unload at a time
        self._estimate: int | None = None
        self.fingerprint = (
            "fp_" + hashlib.sha256(f"{model_id}:{spec.dtype}:{spec.quantize}".encode()).hexdigest()[:10]
        )

    def load(self, warmup: str, compilation_cache: str | None) -> None:
        """Load the model, then compile as `warmup` says ("full", "first", "none":
        `Generator.warmup`); the model serves from then on."""
        s = self.spec
        t0 = time.monotonic()
        try:
            gen = open_generator(s, compilation_cache)
            log.info("loaded %s from %s in %.1f s", self.id, gen.loaded.path, time.monotonic() - t0)
            if warmup != "none":
                t1 = time.monotonic()
                gen.warmup(mode=warmup)
                what = "every step shape" if warmup == "full" else "a first request's steps"
                log.info("%s: warm-up compiled %s in %.1f s", self.id, what, time.monotonic() - t1)
        except Exception as e:  # noqa: BLE001 - reported by /health and the model's routes
            self.status, self.error = "error", f"{type(e).__name__}: {e}"
            log.error("model %s could not be loaded: %s", self.id, self.error)
            return
        self.generator = gen
        self.status = "ok"
        log.info(
            "serving %s (%s activations, quantize=%s) on %d slots of %d tokens, %.1f s after its load began%s",
            ", ".join(self.names),
            gen.loaded.model.dtype.__name__,
            s.quantize or "none",
            s.max_slots,
            gen.max_seq_len,
            time.monotonic() - t0,
            f"; {n} step shapes compile in the background" if (n := gen.compile_status()["pending"]) else "",
        )

    def compile_status(self) -> dict | None:
        """The generator's step-compile counts (`Generator.compile_status`); None unloaded."""
        gen = self.generator
        return None if gen is None else gen.compile_status()

    @property
    def healthy(self) -> bool:
        gen = self.generator
        return self.status == "ok" and gen is not None and gen.loop.error is None and gen.loop.running

    def stalled_for(self) -> float:
        """Seconds the engine has had work without finishing a step (0: it is keeping up)."""
        gen = self.generator
        return gen.loop.stalled_for() if gen is not None and gen.loop.running else 0.0

    def estimate(self) -> int:
        """Bytes of weights and KV cache this model holds when loaded."""
        if self._estimate is None:
            s = self.spec
            self._estimate = estimate_memory(
                s.model, s.dtype, s.quantize, s.max_slots, s.max_seq_len, revision=s.revision
            )
        return self._estimate

    @property
    def busy(self) -> bool:
        gen = self.generator
        return gen is not None and bool(gen.scheduler.live_slots or gen.scheduler.waiting or gen.loop.backlog)

    def unload(self) -> None:
        gen, self.generator = self.generator, None
        self.status = "unloaded"
        if gen is not None:
            gen.close()
        del gen
        gc.collect()
        log.info("unloaded %s", self.id)

    def answer_name(self, requested: str | None) -> str:
        """The name a response gives: the one asked for when it is one of this model's, else
        the model's id (a single model answers any name)."""
        return requested if requested in self.names else self.id

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
        self.failed: str | None = None  # why an engine stopped; the process then exits
        # How to stop serving after an engine failure: `llama-jax serve` sets its own graceful
        # shutdown (and exits with EXIT_ENGINE_FAILED); under bare hypercorn the process exits.
        self.request_exit: Callable[[], None] | None = None
        self._tasks: list[asyncio.Task] = []

    @property
    def names(self) -> list[str]:
        return [n for m in self.models for n in m.names]

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._load_all()), loop.create_task(self._watch_engines())]
        if any(m.spec.idle_unload_s > 0 for m in self.models):
            self._tasks.append(loop.create_task(self._unload_idle()))

    async def _load_all(self) -> None:
        for entry in self.models:
            if entry.status == "loading":
                await self._load(entry)

    async def _load(self, entry: ModelEntry) -> None:
        """Load `entry` on a worker thread, unless the memory budget says it does not fit."""
        budget = self.settings.memory_budget_mb * 2**20
        if budget:
            try:
                need = entry.estimate()
            except Exception as e:  # noqa: BLE001 - a model that cannot be read fails its load
                entry.status, entry.error = "error", f"{type(e).__name__}: {e}"
                return
            used = sum(m.estimate() for m in self.models if m is not entry and m.status in ("ok", "loading"))
            if used + need > budget:
                loaded = ", ".join(m.id for m in self.models if m is not entry and m.status == "ok") or "none"
                message = (
                    f"Loading model {entry.id} needs about {need / 2**20:.0f} MB, but only "
                    f"{max(0, budget - used) / 2**20:.0f} MB of the {budget / 2**20:.0f} MB memory budget "
                    f"is free (loaded: {loaded})."
                )
                if entry.spec.lazy:
                    entry.status = "unloaded"
                    raise unavailable(
                        message + " Retry when another model has been unloaded.", "insufficient_memory"
                    )
                entry.status, entry.error = "error", message
                log.error("%s", message)
                return
        entry.status = "loading"
        await asyncio.to_thread(entry.load, self.settings.warmup, self.settings.compilation_cache)

    async def _unload_idle(self, every: float = 0.5) -> None:
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            for entry in self.models:
                idle = entry.spec.idle_unload_s
                if entry.busy:
                    entry.last_used = now  # idle time counts from the end of the last request
                    continue
                if idle > 0 and entry.status == "ok" and now - entry.last_used > idle:
                    async with entry.lock:
                        if (
                            entry.status == "ok"
                            and not entry.busy
                            and time.monotonic() - entry.last_used > idle
                        ):
                            await asyncio.to_thread(entry.unload)

    async def _watch_engines(self, every: float = 0.25) -> None:
        """Exit when an engine thread dies, so that a supervisor restarts the process.

        The dead engine has already failed its requests (each client got an error object) and
        `/health` says `error`; a fresh process is the one state known to be good (the device
        may hold a half-donated cache). The process waits `FAILURE_GRACE_S` so those errors
        reach their clients, up to `FAILURE_DRAIN_S` for other models' running requests, then
        exits with status `EXIT_ENGINE_FAILED`."""
        while self.failed is None:
            await asyncio.sleep(every)
            for entry in self.models:
                gen = entry.generator
                # The error, not a stopped thread: a loop stopped on purpose (unload, close, a
                # follower process of a multi-host mesh) is no failure.
                if entry.status == "ok" and gen is not None and gen.loop.error is not None:
                    if self.draining:  # a normal shutdown stops the engines itself
                        return
                    self.failed = f"{entry.id}: {gen.loop.error!r}"
                    break
        log.critical("the inference engine of %s stopped; exiting for a restart", self.failed)
        await asyncio.sleep(FAILURE_GRACE_S)
        self.draining = True
        deadline = time.monotonic() + FAILURE_DRAIN_S
        while any(m.busy for m in self.models if m.healthy) and time.monotonic() < deadline:
            await asyncio.sleep(every)
        if self.request_exit is not None:
            self.request_exit()
            return
        log.critical("exiting with status %d after an engine failure", EXIT_ENGINE_FAILED)
        logging.shutdown()
        os._exit(EXIT_ENGINE_FAILED)  # bare hypercorn offers an app no way to stop it

    async def close(self) -> None:
        self.draining = True
        for task in self._tasks:
            if not task.done():
                task.cancel()  # models not started yet stay unloaded; the one loading finishes
        for entry in self.models:
            if entry.generator is not None:
                await asyncio.to_thread(entry.generator.close)

    # -- per request -----------------------------------------------------------------------------

    def get(self, name: str | None, exact: bool = False) -> ModelEntry:
        """The model called `name` (the first model when None), or a 404. A single model
        answers to any name unless `strict_model_names` (or `exact`) says otherwise."""
        if name is None:
            return self.models[0]
        entry = self.by_name.get(name)
        if entry is None:
            if len(self.models) == 1 and not (exact or self.settings.strict_model_names):
                return self.models[0]
            raise model_not_found(name)
        return entry

    async def generator(self, name: str | None) -> Generator:
        """The ready generator of the model called `name`, loading a lazy model first."""
        entry = self.get(name)
        if self.draining:
            raise unavailable("The server is shutting down.", code="server_shutting_down")
        entry.last_used = time.monotonic()
        if entry.status == "unloaded":
            async with entry.lock:
                if entry.status == "unloaded":
                    await self._load(entry)
            entry.last_used = time.monotonic()
        return entry.ready()

    @property
    def healthy(self) -> bool:
        return all(m.healthy or m.status == "unloaded" for m in self.models)


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

"""The persistent XLA compilation cache, so a restart does not pay the compiles again."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

log = logging.getLogger(__name__)

_enabled: str | None = None


def default_cache_dir() -> Path:
    env = os.environ.get("LLAMA_JAX_COMPILATION_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llama-jax" / "xla"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Turn on JAX's persistent compilation cache at `path` (default: `default_cache_dir()`)."""
    global _enabled
    target = Path(path) if path else default_cache_dir()
    if _enabled == str(target):
        return target
    target.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(target))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _enabled = str(target)
    log.info("XLA compilation cache: %s", target)
    return target


class CompileCounter:
    """Counts jit traces and XLA compiles while active (`with CompileCounter() as c: ...`).

    A trace happens for every new shape, dtype or static value a jitted function sees, so
    `c.traces == 0` proves a workload reused compiled code; `c.compiles` counts backend
    compiles (0 on a persistent-cache hit).
    """

    _TRACE = "/jax/core/compile/jaxpr_trace_duration"
    _COMPILE = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.traces = 0
        self.compiles = 0
        self._on = False

    def _listen(self, event: str, duration: float, **_) -> None:
        if not self._on:
            return
        if event == self._TRACE:
            self.traces += 1
        elif event == self._COMPILE:
            self.compiles += 1

    def __enter__(self) -> CompileCounter:
        from jax import monitoring

        self._on = True
        monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        from jax import monitoring

        self._on = False
        monitoring.unregister_event_duration_listener(self._listen)

"""Server settings: one frozen dataclass, filled from `LLAMA_JAX_*` environment variables
(for `hypercorn serve.app:app`) or from `llama-jax serve` flags."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

PREFIX = "LLAMA_JAX_"


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str | None = None  # alias, GGUF file or Hugging Face folder; None: the default model
    aliases: tuple[str, ...] = ()  # extra names the model answers to
    host: str = "127.0.0.1"
    port: int = 8080
    max_slots: int = 8
    max_seq_len: int = 2048
    dtype: str = "float32"
    quantize: str | None = None
    max_queue: int = 256
    warmup: bool = True
    chat_template: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    compilation_cache: str | None = "default"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from `LLAMA_JAX_MODEL`, `LLAMA_JAX_ALIAS` (comma-separated), `LLAMA_JAX_PORT`..."""
        env = os.environ if environ is None else environ
        values: dict = {}
        for f in dataclasses.fields(cls):
            key = PREFIX + ("ALIAS" if f.name == "aliases" else f.name.upper())
            raw = env.get(key)
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = _parse(f.name, raw)
            except ValueError as e:
                raise ValueError(f"{key}={raw!r}: {e}") from None
        return cls(**values)


def _parse(name: str, raw: str):
    default = getattr(Settings, name, None)
    if name == "aliases":
        return tuple(a.strip() for a in raw.split(",") if a.strip())
    if name == "warmup":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if isinstance(default, int) and not isinstance(default, bool):
        return int(raw)
    if name in ("quantize", "compilation_cache") and raw.lower() in ("none", "off"):
        return None
    return raw

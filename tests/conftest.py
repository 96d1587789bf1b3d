"""Shared fixtures. The real default model is loaded once per session; most tests use tiny
random models. JAX's persistent compilation cache lives in the repo's `.jax_cache/`."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault(
    "LLAMA_JAX_COMPILATION_CACHE", str(Path(__file__).resolve().parent.parent / ".jax_cache")
)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from llama_jax.model import Llama  # noqa: E402
from llama_jax.xla_cache import enable_compilation_cache  # noqa: E402

enable_compilation_cache()


@pytest.fixture(scope="session")
def tiny_model() -> Llama:
    """A tiny random model in memory (tests/tiny.py's config and weights)."""
    from tiny import random_tensors, tiny_config

    from llama_jax.weights import build_model, pack_tensors

    cfg = tiny_config()
    return build_model(cfg, pack_tensors(cfg, random_tensors(cfg).items(), "tiny"))


@pytest.fixture(scope="session")
def smollm_meta():
    """(GGUF metadata, path) of the default model, without loading its weights."""
    from llama_jax.gguf import GGUFFile
    from llama_jax.weights import resolve_model_path

    _, path = resolve_model_path(None)
    return GGUFFile(path).metadata, path


@pytest.fixture(scope="session")
def smollm2():
    """The real default model, once per session (float32, 4 slots of 512 positions)."""
    from llama_jax import Generator

    return Generator.from_pretrained(max_seq_len=512, max_slots=4)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)

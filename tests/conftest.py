"""Shared fixtures. The real default model is loaded once per session; most tests use tiny
random models. JAX's persistent compilation cache lives in the repo's `.jax_cache/`."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault(
    "LLAMA_JAX_COMPILATION_CACHE", str(Path(__file__).resolve().parent.parent / ".jax_cache")
)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from llama_jax.config import LlamaConfig  # noqa: E402
from llama_jax.model import Llama  # noqa: E402
from llama_jax.xla_cache import enable_compilation_cache  # noqa: E402

enable_compilation_cache()

TINY = LlamaConfig(
    vocab_size=96,
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    rope_theta=10000.0,
    context_length=512,
    eos_ids=(2,),
)


def random_llama(cfg: LlamaConfig = TINY, seed: int = 0, scale: float = 10.0) -> Llama:
    """An in-memory random model; weights scaled up from the 0.02 init so logits are peaked."""
    model = Llama(cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, state)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="session")
def tiny_model() -> Llama:
    return random_llama()


@pytest.fixture(scope="session")
def smollm2():
    """The real default model, once per session (float32, 4 slots of 512 positions)."""
    from llama_jax import Generator

    return Generator.from_pretrained(max_seq_len=512, max_slots=4)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)

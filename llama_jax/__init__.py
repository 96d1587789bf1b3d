"""llama_jax: Llama-family language models on JAX/XLA.

from llama_jax import Generator, SamplingParams

The public API is `__all__`: what notebooks, scripts and the server (`serve/`, held to it by
`tests/test_boundary.py`) import.
"""

from importlib.metadata import PackageNotFoundError, version

from llama_jax.compiler import WARMUP_MODES
from llama_jax.constrain import Grammar
from llama_jax.errors import (
    ContextLengthError,
    EngineDeadError,
    InvalidRequestError,
    LlamaJaxError,
    ModelLoadError,
    OverloadedError,
    TemplateError,
)
from llama_jax.generator import Completion, Generator, PreparedChat, SlotInfo
from llama_jax.sampling import FIELDS as SAMPLING_FIELDS
from llama_jax.sampling import SamplingParams
from llama_jax.scheduler import Delta, Usage
from llama_jax.sharding import initialize_distributed
from llama_jax.stopping import DEFAULT_MAX_TOKENS, MAX_STOP_CHARS, StopRules
from llama_jax.tools import ToolCall
from llama_jax.weights import DEFAULT_MODEL, LoadOptions, estimate_memory, resolve_model_path

try:
    __version__ = version("llama-jax")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_MODEL",
    "MAX_STOP_CHARS",
    "SAMPLING_FIELDS",
    "WARMUP_MODES",
    "Completion",
    "ContextLengthError",
    "Delta",
    "EngineDeadError",
    "Generator",
    "Grammar",
    "InvalidRequestError",
    "LlamaJaxError",
    "LoadOptions",
    "ModelLoadError",
    "OverloadedError",
    "PreparedChat",
    "SamplingParams",
    "SlotInfo",
    "StopRules",
    "TemplateError",
    "ToolCall",
    "Usage",
    "estimate_memory",
    "initialize_distributed",
    "resolve_model_path",
]

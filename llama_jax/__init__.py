"""llama_jax: Llama-family language models on JAX/XLA.

from llama_jax import Generator, SamplingParams
"""

from importlib.metadata import PackageNotFoundError, version

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
from llama_jax.generator import Completion, Generator
from llama_jax.sampling import SamplingParams
from llama_jax.scheduler import Delta, Usage
from llama_jax.stopping import StopRules
from llama_jax.tools import ToolCall

try:
    __version__ = version("llama-jax")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Completion",
    "ContextLengthError",
    "Delta",
    "EngineDeadError",
    "Generator",
    "Grammar",
    "InvalidRequestError",
    "LlamaJaxError",
    "ModelLoadError",
    "OverloadedError",
    "SamplingParams",
    "StopRules",
    "TemplateError",
    "ToolCall",
    "Usage",
]

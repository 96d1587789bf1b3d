"""llama_jax: Llama-family language models on JAX/XLA.

from llama_jax import Generator, SamplingParams
"""

from llama_jax.constrain import Grammar
from llama_jax.engine import Delta, Usage
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
from llama_jax.tools import ToolCall

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
    "TemplateError",
    "ToolCall",
    "Usage",
]

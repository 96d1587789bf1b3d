"""Typed exceptions of llama_jax.

Each one is mapped once, in `serve/`, to an HTTP status and an OpenAI error object; the
library itself never knows about HTTP.
"""


class LlamaJaxError(Exception):
    """Base class of every error this library raises on purpose."""


class ModelLoadError(LlamaJaxError):
    """A model file or folder is missing, corrupt or unsupported.

    The message always names the file and the problem.
    """

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class InvalidRequestError(LlamaJaxError):
    """A request's values are invalid (out of range, wrong type, unknown option)."""

    def __init__(self, message: str, param: str | None = None):
        self.param = param
        super().__init__(message)


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested tokens do not fit in the model's context."""


class OverloadedError(LlamaJaxError):
    """The waiting queue is full; the caller should retry later."""


class TemplateError(LlamaJaxError):
    """A chat template failed to render (syntax error, sandbox violation, limits)."""


class EngineDeadError(LlamaJaxError):
    """The engine thread stopped on an unexpected error; the model cannot serve until restarted."""

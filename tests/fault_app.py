"""`hypercorn fault_app:app` (with `tests/` on PYTHONPATH): the real app, with a fault that
can be injected into the engine thread. Once the file named by `LLAMA_JAX_TEST_FAULT_FILE`
exists, the next `Engine.step()` raises, as a device or XLA failure would."""

import os
from pathlib import Path

from llama_jax.engine import Engine

_step = Engine.step
_trigger = Path(os.environ["LLAMA_JAX_TEST_FAULT_FILE"])


def _faulty_step(self: Engine) -> None:
    if _trigger.exists():
        raise RuntimeError("injected engine fault")
    _step(self)


Engine.step = _faulty_step

from serve.app import app  # noqa: E402 - after the patch: the app's engine uses it

__all__ = ["app"]

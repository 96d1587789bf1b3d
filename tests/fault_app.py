"""`hypercorn fault_app:app` (with `tests/` on PYTHONPATH): the real app, with a fault that
can be injected into the engine thread. Once the file named by `LLAMA_JAX_TEST_FAULT_FILE`
exists, the next `Scheduler.step()` raises, as a device or XLA failure would. While the file
named by `LLAMA_JAX_TEST_STALL_FILE` exists, a step does not return, as a hung device call."""

import os
import time
from pathlib import Path

from llama_jax.scheduler import Scheduler

_step = Scheduler.step
_trigger = Path(os.environ["LLAMA_JAX_TEST_FAULT_FILE"])
_stall = Path(os.environ.get("LLAMA_JAX_TEST_STALL_FILE", "/nonexistent/stall"))


def _faulty_step(self: Scheduler) -> None:
    if _trigger.exists():
        raise RuntimeError("injected engine fault")
    while _stall.exists():
        time.sleep(0.05)
    _step(self)


Scheduler.step = _faulty_step

from serve.app import app  # noqa: E402 - after the patch: the app's engine uses it

__all__ = ["app"]

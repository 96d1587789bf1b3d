"""`StepCompiler`: the runner's step executables, compiled ahead of time and on a worker thread.

A step shape (`("prefill", T, C)`, `("decode", B, C)`, `("copy", 0, C)`) is compiled once, by
`jit(...).lower(abstract arguments).compile()`, which needs no device state: so the compiles a
server will need can run on a worker thread while the engine thread serves requests with the
shapes already compiled (or loaded from the persistent compilation cache).

1. `plan(shapes)` queues shapes for the worker, in the order requests are likely to need them.
2. `get(shape)` returns the executable: at once when compiled, after the worker's compile when
   it is compiling that shape, else compiled now on the caller's thread.
3. `ready(shape)` / `request(shape)` let the engine avoid waiting: a shape a new request needs
   is moved to the front of the worker's queue, and the request waits (while running streams
   keep decoding) until it is compiled.
4. `status()` counts what is compiled and what is left, for `/health` and the logs.

Compiles run one at a time (under a lock): XLA:CPU's compiler uses several threads, and two
side by side on a 2-core machine took 7-13 s each instead of 1.5-5 s, so a compile requested
while the worker is busy waits for the worker's current one, then runs.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

Shape = tuple[str, int, int]  # (function, T or B, C)
# How much to compile before serving (`Generator.warmup`): a first request's steps, then the
# rest in the background; everything; nothing (each shape when first needed).
WARMUP_MODES = ("first", "full", "none")


def describe(shape: Shape) -> str:
    kind, n, c = shape
    if kind == "prefill":
        return f"prefill T={n} C={c}"
    if kind == "decode":
        return f"decode B={n} C={c}"
    return f"copy C={c}"


class StepCompiler:
    def __init__(self, lower: Callable[[Shape], Any], name: str = "llama-jax-compiler"):
        """`lower(shape)`: the `jax.stages.Lowered` of one step shape."""
        self._lower = lower
        self._name = name
        self._done: dict[Shape, Any] = {}
        self._running: dict[Shape, concurrent.futures.Future] = {}
        self._queue: list[Shape] = []
        self._known: set[Shape] = set()  # every shape planned or compiled, for the counts
        self._cv = threading.Condition()
        self._compile_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._announce = False  # log when the worker's queue runs dry
        self.seconds = 0.0  # spent compiling (or loading from the compilation cache)

    # -- queries ---------------------------------------------------------------------------------

    def ready(self, shape: Shape) -> bool:
        return shape in self._done

    def status(self) -> dict:
        """{"compiled": n, "pending": m} over the shapes planned or met so far; "compiling":
        the shape the worker (or a caller) is compiling now, or None."""
        with self._cv:
            running = next(iter(self._running), None)
            return {
                "compiled": len(self._done),
                "pending": len(self._known) - len(self._done),
                "compiling": None if running is None else describe(running),
            }

    # -- compiling -------------------------------------------------------------------------------

    def get(self, shape: Shape) -> Any:
        """The executable of `shape`, compiled now on this thread unless it is compiled or
        compiling already (then this waits for it)."""
        exe = self._done.get(shape)
        return exe if exe is not None else self._compile(shape, "on demand")

    def plan(self, shapes: Iterable[Shape]) -> None:
        """Compile `shapes` on the worker thread, in this order, after any queued before (and
        log when they are done)."""
        with self._cv:
            self._announce = True
            for s in shapes:
                if s not in self._done and s not in self._queue:
                    self._queue.append(s)
                self._known.add(s)
            self._start_worker()
            self._cv.notify_all()

    def request(self, shapes: list[Shape]) -> None:
        """Compile `shapes` next on the worker, in this order (a request is waiting for them)."""
        with self._cv:
            for shape in reversed(shapes):
                if shape in self._done or shape in self._running:
                    continue
                if shape in self._queue:
                    self._queue.remove(shape)
                self._queue.insert(0, shape)
                self._known.add(shape)
            self._start_worker()
            self._cv.notify_all()

    def compile_all(self, shapes: list[Shape], progress: bool = False) -> None:
        """Compile `shapes` on this thread, now, in this order."""
        with self._cv:
            self._known.update(shapes)
        todo = [s for s in shapes if s not in self._done]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="compiling", unit="fn", leave=False)
        for s in todo:
            self._compile(s, "warm-up")
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()

    def close(self, timeout: float = 60.0) -> None:
        """Stop the worker after its current compile (waited for: XLA aborts the process if
        it exits in the middle of one); what is queued is dropped."""
        atexit.unregister(self.close)
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _compile(self, shape: Shape, why: str) -> Any:
        with self._cv:
            if shape in self._done:
                return self._done[shape]
            fut = self._running.get(shape)
            mine = fut is None
            if mine:
                fut = self._running[shape] = concurrent.futures.Future()
                self._known.add(shape)
                if shape in self._queue:
                    self._queue.remove(shape)
        if not mine:
            return fut.result()
        t0 = time.monotonic()
        try:
            with self._compile_lock:
                exe = self._lower(shape).compile()
        except BaseException as e:
            with self._cv:
                del self._running[shape]
            fut.set_exception(e)
            raise
        dt = time.monotonic() - t0
        with self._cv:
            self._done[shape] = exe
            del self._running[shape]
            self.seconds += dt
            done, left = len(self._done), len(self._known) - len(self._done)
        fut.set_result(exe)
        # One line per shape (for logs that are not a terminal: journalctl, containers).
        level = logging.DEBUG if why == "warm-up" and sys.stderr.isatty() else logging.INFO
        log.log(
            level, "compiled %s (%s) in %.1f s: %d compiled, %d left", describe(shape), why, dt, done, left
        )
        return exe

    # -- the worker ------------------------------------------------------------------------------

    def _start_worker(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
            atexit.register(self.close)

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                shape = self._queue.pop(0)
            try:
                self._compile(shape, "background")
            except Exception:  # noqa: BLE001 - the step that needs it compiles again and raises there
                log.exception("background compile of %s failed", describe(shape))
            with self._cv:
                finished = self._announce and not self._queue and not self._running and not self._closed
                if finished:
                    self._announce = False
                done, seconds = len(self._done), self.seconds
            if finished:
                log.info("every planned step shape is compiled: %d in %.1f s of compiling", done, seconds)

"""`EngineLoop`: the one thread that owns the device, and the bridge to callers.

    loop = EngineLoop(engine).start()
    async for delta in loop.astream(prompt_ids, SamplingParams()): ...   # asyncio (the server)
    for delta in loop.stream(prompt_ids, SamplingParams()): ...          # threads, notebooks
    vectors = loop.call(lambda: runner.embed(rows))                      # any device work

Callers never touch the engine: `submit` validates on the caller's thread (so a bad request
fails at once, before any device work) and posts the request to an inbox; the engine thread
drains the inbox, runs `Engine.step()` while there is work, and hands each request's deltas to
its sink (`loop.call_soon_threadsafe` for asyncio). With nothing to do it blocks on the inbox,
so an idle server uses no CPU. Cancelling (a client that went away, a closed generator) posts
a cancel that frees the slot before the next decode step.

If the thread dies, every waiting request receives `EngineDeadError` and later submits raise
it at once: callers never hang on a dead engine.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from llama_jax.engine import Delta, Engine, Request
from llama_jax.errors import EngineDeadError, OverloadedError
from llama_jax.sampling import SamplingParams

log = logging.getLogger(__name__)

Sink = Callable[[Delta | BaseException], None]
_STOP = object()


class EngineLoop:
    def __init__(self, engine: Engine, name: str = "llama-jax-engine"):
        self.engine = engine
        engine.deliver = self._deliver  # first tokens reach their callers mid-step
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[Request, Sink] = {}
        self._posted = 0  # submits in the inbox, not yet in engine.waiting
        self._stopped = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> EngineLoop:
        self._thread.start()
        # Stop the thread before JAX's own exit handlers (registered earlier, so run later)
        # tear the runtime down under it.
        atexit.register(self.close)
        return self

    @property
    def backlog(self) -> int:
        """Requests posted but not yet queued by the engine thread."""
        return self._posted

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread after the current step; requests still running are cancelled."""
        atexit.unregister(self.close)
        if self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout)

    # -- from any thread ------------------------------------------------------------------------

    def submit(
        self, prompt_ids: Sequence[int], params: SamplingParams, sink: Sink, request_id: str | None = None
    ) -> Request:
        """Validate and post a request; `sink` receives its deltas on the engine thread."""
        self._check_alive()
        req = self.engine.make_request(prompt_ids, params, request_id)
        with self._lock:  # with _run's exit under the same lock, nothing is posted to a dead loop
            self._check_alive()
            if self._posted + len(self.engine.waiting) >= self.engine.max_queue:
                raise OverloadedError(f"the waiting queue is full ({self.engine.max_queue} requests)")
            self._posted += 1
            self._inbox.put(("submit", req, sink))
        return req

    def submit_group(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        sinks: Sequence[Sink],
        request_id: str | None = None,
    ) -> list[Request]:
        """`len(sinks)` samples of one prompt sharing one prefill (OpenAI's `n`), posted together."""
        self._check_alive()
        group = self.engine.make_group(prompt_ids, params, len(sinks), request_id)
        with self._lock:
            self._check_alive()
            if self._posted + len(self.engine.waiting) + len(group) > self.engine.max_queue:
                raise OverloadedError(f"the waiting queue is full ({self.engine.max_queue} requests)")
            self._posted += len(group)
            for req, sink in zip(group, sinks, strict=True):
                self._inbox.put(("submit", req, sink))
        return group

    def cancel(self, req: Request) -> None:
        if not req.finished:
            self._inbox.put(("cancel", req))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread (device work such as embeddings) and return its result."""
        return self.call_async(fn).result()

    def call_async(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._check_alive()
            self._inbox.put(("call", fn, fut))
        return fut

    async def astream(
        self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[Delta]:
        """Deltas of one request; closing the generator (or cancelling its task) cancels it."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink(item: Delta | BaseException) -> None:
            if not loop.is_closed():  # a closed loop means the consumer is gone; its cancel is posted
                loop.call_soon_threadsafe(q.put_nowait, item)

        req = self.submit(prompt_ids, params, sink, request_id)
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.cancel(req)

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[Delta]:
        """Blocking counterpart of `astream` for threads and notebooks."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        req = self.submit(prompt_ids, params, q.put)
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.cancel(req)

    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped: {self.error!r}") from self.error
        if self._stopped or not self._thread.is_alive():
            raise EngineDeadError("the engine thread is not running")

    # -- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        error: BaseException = EngineDeadError("the engine was shut down")
        try:
            while True:
                if not self._drain(block=not self.engine.has_work):
                    break
                if self.engine.has_work:
                    self.engine.step()
                    self._deliver()
            for req in list(self._sinks):
                self.engine.cancel(req)
        except BaseException as e:  # noqa: BLE001 - any failure must reach every waiting caller
            log.exception("engine thread died")
            self.error = error = e
        with self._lock:
            self._stopped = True
        self._fail_all(error)

    def _drain(self, block: bool) -> bool:
        """Apply posted commands; False when asked to stop."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if item is _STOP:
                return False
            kind = item[0]
            if kind == "submit":
                _, req, sink = item
                with self._lock:
                    self._posted -= 1
                self._sinks[req] = sink
                self.engine.enqueue(req)
            elif kind == "cancel":
                req = item[1]
                self.engine.cancel(req)
                self._sinks.pop(req, None)
            elif kind == "call":
                _, fn, fut = item
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except Exception as e:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(e)

    def _deliver(self) -> None:
        for req in [r for r in self._sinks if r.deltas]:
            sink = self._sinks[req]
            try:
                while req.deltas:
                    sink(req.deltas.popleft())
            except Exception:  # noqa: BLE001 - a broken consumer loses its request, not the engine
                log.exception("dropping request %s: its consumer failed", req.id)
                self.engine.cancel(req)
                del self._sinks[req]
                continue
            if req.finished:
                del self._sinks[req]

    def _fail_all(self, error: BaseException) -> None:
        """Every waiting caller gets `EngineDeadError` (runs after `_stopped`: no new posts)."""
        dead = (
            error if isinstance(error, EngineDeadError) else EngineDeadError(f"the engine stopped: {error!r}")
        )
        sinks = list(self._sinks.values())
        self._sinks.clear()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP and item[0] == "submit":
                sinks.append(item[2])
            elif item is not _STOP and item[0] == "call" and item[2].set_running_or_notify_cancel():
                item[2].set_exception(dead)  # a caller that already gave up has nothing to hear
        for sink in sinks:
            try:
                sink(dead)
            except Exception:  # noqa: BLE001 - the consumer is gone; nothing left to tell
                log.debug("a consumer could not be told that the engine stopped", exc_info=True)

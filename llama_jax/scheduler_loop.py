"""`SchedulerLoop`: the one thread that owns the device, and the bridge to callers.

    loop = SchedulerLoop(scheduler).start()
    async for delta in loop.astream(prompt_ids, SamplingParams(), StopRules()): ...  # asyncio
    for delta in loop.stream(prompt_ids, SamplingParams(), StopRules()): ...         # threads
    vectors = loop.embed(rows)                                                       # embeddings
    loop.call(lambda: scheduler.warmup())                                            # device work

Callers never touch the scheduler: `submit` validates on the caller's thread (so a bad request
fails at once, before any device work) and posts the request to an inbox; the scheduler thread
drains the inbox, runs `Scheduler.step()` while there is work, and hands each request's deltas to
its sink (`loop.call_soon_threadsafe` for asyncio). With nothing to do it blocks on the inbox,
so an idle server uses no CPU. Cancelling (a client that went away, a closed generator) posts
a cancel that frees the slot before the next decode step; a cancelled embeddings request
stops after its current chunk. Since every step is bounded, commands (cancels, a stop) take
effect within one step, and `stalled_for()` tells a health check when the thread has had work
but finished no step for a while (a device call that hangs).

If the thread dies, every waiting request receives `EngineDeadError` and later submits raise
it at once: callers never hang on a dead engine. ("Engine" is the user-visible name of the whole
inference engine, scheduler and device together: the error, the thread's name `llama-jax-engine`
and its log lines keep it.)
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import numpy as np

from llama_jax.constrain import Grammar
from llama_jax.errors import EngineDeadError
from llama_jax.sampling import SamplingParams
from llama_jax.scheduler import Delta, EmbedJob, Request, Scheduler
from llama_jax.stopping import StopRules

log = logging.getLogger(__name__)

Sink = Callable[[Delta | BaseException], None]
_STOP = object()


class SchedulerLoop:
    def __init__(self, scheduler: Scheduler, name: str = "llama-jax-engine"):
        self.scheduler = scheduler
        scheduler.deliver = self._deliver  # first tokens reach their callers mid-step
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[Request, Sink] = {}
        self._posted = 0  # submits in the inbox, not yet in scheduler.waiting
        self._posted_by_client: collections.Counter[str] = collections.Counter()
        self._embeds: dict[EmbedJob, concurrent.futures.Future] = {}
        # When the thread last finished a step or woke up with work; `_idle` while it waits.
        self.progress_at = time.monotonic()
        self._idle = True
        self._stopped = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> SchedulerLoop:
        self._thread.start()
        # Stop the thread before JAX's own exit handlers (registered earlier, so run later)
        # tear the runtime down under it.
        atexit.register(self.close)
        return self

    @property
    def backlog(self) -> int:
        """Requests posted but not yet queued by the scheduler thread."""
        return self._posted

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stalled_for(self) -> float:
        """Seconds the thread has had work (a step, a posted command) without finishing a step;
        0 while it waits for work or keeps finishing steps."""
        if self._idle or not self._thread.is_alive():
            return 0.0
        return time.monotonic() - self.progress_at

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread after the current step; requests still running are cancelled."""
        atexit.unregister(self.close)
        if self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout)

    # -- from any thread ------------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        rules: StopRules,
        sink: Sink,
        *,
        grammar: Grammar | None = None,
        request_id: str | None = None,
        client: str | None = None,
    ) -> Request:
        """Validate and post a request; `sink` receives its deltas on the scheduler thread.
        `client` (a key, an address) is held to its share of the queue."""
        self._check_alive()
        req = self.scheduler.make_request(
            prompt_ids, params, rules, grammar=grammar, request_id=request_id, client=client
        )
        self._post([req], [sink])
        return req

    def submit_group(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        rules: StopRules,
        sinks: Sequence[Sink],
        *,
        grammar: Grammar | None = None,
        request_id: str | None = None,
        client: str | None = None,
    ) -> list[Request]:
        """`len(sinks)` samples of one prompt sharing one prefill (OpenAI's `n`), posted together."""
        self._check_alive()
        group = self.scheduler.make_group(
            prompt_ids, params, rules, len(sinks), grammar=grammar, request_id=request_id, client=client
        )
        self._post(group, sinks)
        return group

    def _post(self, group: list[Request], sinks: Sequence[Sink]) -> None:
        client = group[0].client
        with self._lock:  # with _run's exit under the same lock, nothing is posted to a dead loop
            self._check_alive()
            mine = self._posted_by_client[client] if client is not None else 0
            self.scheduler.check_room(len(group), client, self._posted, mine)
            self._posted += len(group)
            if client is not None:
                self._posted_by_client[client] += len(group)
            for req, sink in zip(group, sinks, strict=True):
                self._inbox.put(("submit", req, sink))

    def cancel(self, req: Request) -> None:
        if not req.finished:
            self._inbox.put(("cancel", req))

    def embed(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Embeddings [len(rows), D] of validated token-id rows, computed a chunk per scheduler step."""
        job, fut = self.submit_embedding(rows)
        try:
            return fut.result()
        finally:
            self.cancel_embedding(job)

    async def aembed(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """`embed` for asyncio: cancelling the awaiting task stops the work after its current chunk."""
        job, fut = self.submit_embedding(rows)
        try:
            return await asyncio.wrap_future(fut)
        finally:
            self.cancel_embedding(job)

    def submit_embedding(self, rows: Sequence[Sequence[int]]) -> tuple[EmbedJob, concurrent.futures.Future]:
        job = self.scheduler.make_embedding(rows)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._check_alive()
            self._inbox.put(("embed", job, fut))
        return job, fut

    def cancel_embedding(self, job: EmbedJob) -> None:
        """Stop an embeddings request (no-op once it is done)."""
        if not job.finished:
            self._inbox.put(("cancel_embedding", job))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the scheduler thread (device work such as embeddings) and return its result."""
        return self.call_async(fn).result()

    def call_async(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._check_alive()
            self._inbox.put(("call", fn, fut))
        return fut

    async def astream(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        rules: StopRules,
        *,
        grammar: Grammar | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[Delta]:
        """Deltas of one request; closing the generator (or cancelling its task) cancels it."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink(item: Delta | BaseException) -> None:
            if not loop.is_closed():  # a closed loop means the consumer is gone; its cancel is posted
                loop.call_soon_threadsafe(q.put_nowait, item)

        req = self.submit(prompt_ids, params, rules, sink, grammar=grammar, request_id=request_id)
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

    def stream(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        rules: StopRules,
        *,
        grammar: Grammar | None = None,
    ) -> Iterator[Delta]:
        """Blocking counterpart of `astream` for threads and notebooks."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        req = self.submit(prompt_ids, params, rules, q.put, grammar=grammar)
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

    # -- the scheduler thread ------------------------------------------------------------------

    def _run(self) -> None:
        error: BaseException = EngineDeadError("the engine was shut down")
        try:
            while True:
                if not self._drain(block=not self.scheduler.has_work):
                    break
                if self.scheduler.has_work:
                    self.scheduler.step()
                    self.progress_at = time.monotonic()
                    self._deliver()
            for req in list(self._sinks):
                self.scheduler.cancel(req)
            for job in list(self._embeds):
                self.scheduler.cancel_embedding(job)
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
                if block:
                    self._idle = True
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if block:
                self.progress_at = time.monotonic()  # a stall counts from when work arrived
                self._idle = block = False
            if item is _STOP:
                return False
            kind = item[0]
            if kind == "submit":
                _, req, sink = item
                with self._lock:
                    self._posted -= 1
                    if req.client is not None:
                        self._posted_by_client[req.client] -= 1
                        if self._posted_by_client[req.client] <= 0:
                            del self._posted_by_client[req.client]
                self._sinks[req] = sink
                self.scheduler.enqueue(req)
            elif kind == "cancel":
                req = item[1]
                self.scheduler.cancel(req)
                self._sinks.pop(req, None)
            elif kind == "embed":
                _, job, fut = item
                if fut.set_running_or_notify_cancel():  # else its caller already gave up
                    self._embeds[job] = fut
                    self.scheduler.enqueue_embedding(job)
            elif kind == "cancel_embedding":
                job = item[1]
                self.scheduler.cancel_embedding(job)
                fut = self._embeds.pop(job, None)
                if fut is not None:
                    fut.set_exception(concurrent.futures.CancelledError())
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
            except Exception:  # noqa: BLE001 - a broken consumer loses its request, not the scheduler
                log.exception("dropping request %s: its consumer failed", req.id)
                self.scheduler.cancel(req)
                del self._sinks[req]
                continue
            if req.finished:
                del self._sinks[req]
        for job in [j for j in self._embeds if j.finished]:
            self._embeds.pop(job).set_result(job.out)

    def _fail_all(self, error: BaseException) -> None:
        """Every waiting caller gets `EngineDeadError` (runs after `_stopped`: no new posts)."""
        dead = (
            error if isinstance(error, EngineDeadError) else EngineDeadError(f"the engine stopped: {error!r}")
        )
        sinks = list(self._sinks.values())
        self._sinks.clear()
        futures = list(self._embeds.values())
        self._embeds.clear()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP and item[0] == "submit":
                sinks.append(item[2])
            elif (
                item is not _STOP and item[0] in ("call", "embed") and item[2].set_running_or_notify_cancel()
            ):
                item[2].set_exception(dead)  # a caller that already gave up has nothing to hear
        for fut in futures:
            fut.set_exception(dead)
        for sink in sinks:
            try:
                sink(dead)
            except Exception:  # noqa: BLE001 - the consumer is gone; nothing left to tell
                log.debug("a consumer could not be told that the engine stopped", exc_info=True)

"""The scheduler: continuous batching of requests over the slots of one `Runner`
(`runner.py`'s protocol: a `ModelRunner` on a model, or a fake in the tests).

A request's life, one `step()` at a time:

1. `submit()` validates it (context length; its `SamplingParams` and `StopRules` validated
   themselves) before any device work, builds its sampling row once, and queues it.
2. Admission: while a slot is free, the oldest waiting request takes it: the free slot
   whose cache holds the longest start of its prompt (the prefix cache: a chat's earlier
   turns are not prefilled again). Where a running request's prompt shares a longer start
   (one system prompt for many requests, the n samples of one prompt), that part is copied
   from its slot once it is prefilled there (`_take_shared`). Prompts are
   prefilled in chunks (<= the largest prefill bucket), oldest first, within a budget of
   prompt tokens per step (at least one chunk), so running streams keep producing tokens
   while long prompts or a burst of requests are admitted. The last chunk samples the first
   token. Tokens reach their callers as soon as they exist, not at the end of the step
   (`deliver`): each prompt's first token right after its own prefill, and the previous
   decode step's tokens (which the device finished before this step's first chunk) before
   the host waits for that chunk. A burst of 16 prompts gets first tokens one prefill
   apart, instead of all after the last one.
3. Decode: one batched step for every active slot, dispatched before the host looks at the
   previous step's tokens, so detokenizing overlaps the device work (tokens lag one step;
   a slot that finished keeps computing for that one step, and its output is ignored).
4. Processing: each token is appended, detokenized incrementally, checked against EOS, stop
   tokens, stop strings and limits, and pushed as a `Delta` to the request; finished
   requests free their slot.

Embeddings (`make_embedding`) share the same steps: each step embeds at most one bounded chunk
of rows (`embed_budget` tokens, shortest rows first), and while anything generates, embedding
takes at most `embed_share` of the scheduler's time, so a flood of documents slows streams by a
bounded factor instead of stopping them, and a cancelled embedding request stops after its
current chunk.

Constrained requests (made with a `Grammar`) carry a matcher that gives each step an
allowed-token bitmask and consumes each sampled token. Its next mask depends on the token just
sampled, so while such a request decodes, a step processes the previous step's tokens before
dispatching (no overlap; on CPU the host work is a few percent of a step).

The scheduler itself is single-threaded and synchronous; `scheduler_loop.SchedulerLoop` runs it on
the one thread that owns the device and bridges requests to threads and asyncio.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Sequence

import numpy as np

from llama_jax.constrain import Grammar, GrammarCompiler, Matcher
from llama_jax.errors import ContextLengthError, InvalidRequestError, OverloadedError
from llama_jax.metrics import SchedulerMetrics
from llama_jax.runner import Runner, unpack, unpack_top
from llama_jax.sampling import SamplingParams, SlotSampling
from llama_jax.stopping import StopMatcher, StopRules
from llama_jax.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)

CLOSE_WINDOW = 64  # a constrained request this close to its token limit looks for a way to finish
CLOSE_MARGIN = 5  # ...and takes it when the tokens left exceed its length by no more than this
# (a free token may lengthen the way to finish by up to the margin + 1 and still leave room: `, "`
# opens a key that needs `": ""}`; a request that has lengthened it more gets a wider margin)
CLOSE_RETRY = 4  # tokens before looking again when no way to finish in time was found (doubling)
EMBED_MAX_BATCH = 16  # rows per embedding chunk (`Runner.embed`'s largest batch)
CLIENT_SHARE = 4  # by default one client may hold at most 1/CLIENT_SHARE of the waiting queue


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens reused from a slot's cache (not prefilled again)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass(frozen=True)
class Delta:
    """What one processed token added to a request's output; the last one has the finish
    reason and the request's usage."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str | None = None
    usage: Usage | None = None
    # Per token, the `top_logprobs` most likely (id, logprob) pairs, when the request asked.
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()


@dataclasses.dataclass(frozen=True)
class Token:
    """One sampled token as the host sees it."""

    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    rules: StopRules
    seed: int
    id: str
    row: SlotSampling  # its sampling values as host rows, built once, inserted at its last chunk
    output_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[float] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    deltas: collections.deque = dataclasses.field(default_factory=collections.deque)
    slot: int | None = None
    prefilled: int = 0
    cached_tokens: int = 0
    # A live request whose first n prompt tokens this one shares: once that one has prefilled
    # them, they are copied from its slot instead of prefilled again (`_take_shared`).
    shared: tuple[Request, int] | None = None
    admitted_at: int = 0  # admission order: prefill goes oldest first
    last_event: float = dataclasses.field(default_factory=time.monotonic)  # submit, then each token
    detok: IncrementalDetokenizer | None = None
    stops: StopMatcher | None = None
    matcher: Matcher | None = None  # constrained decoding: the request's place in its grammar
    close_retry_at: int = 0  # output length at which to look for a way to finish in time again
    close_failures: int = 0  # searches for a way to finish in time that found none
    close_seen: tuple[int, int] | None = None  # (output length, closing path length) last looked at
    close_growth: int = 0  # the most one sampled token lengthened the way to finish
    client: str | None = None  # who sent it (an API key or an address), for the per-client queue share

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(eq=False)
class EmbedJob:
    """An embeddings request: its rows are embedded a chunk per step, shortest first (so a
    chunk's rows pad little), into `out` [len(rows), D]."""

    rows: list[list[int]]
    out: np.ndarray
    order: list[int]  # row indices, shortest first
    done: int = 0  # rows of `order` embedded so far
    cancelled: bool = False

    @property
    def finished(self) -> bool:
        return self.cancelled or self.done == len(self.rows)


class Scheduler:
    def __init__(
        self,
        runner: Runner,
        tokenizer: Tokenizer,
        eos_ids: Sequence[int] = (),
        max_queue: int = 256,
        prefix_cache: bool = True,
        prefill_budget: int | None = None,
        max_queue_per_client: int | None = None,
        embed_budget: int | None = None,
        embed_share: float = 0.5,
    ):
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids) | frozenset(tokenizer.eos_ids)
        self.max_queue = max_queue
        # One client (a key, an address) cannot fill the queue and lock everyone else out.
        self.max_queue_per_client = max_queue_per_client or max(1, max_queue // CLIENT_SHARE)
        self.queued_by_client: collections.Counter[str] = collections.Counter()
        self.max_seq_len = runner.max_seq_len
        self.state = runner.init_state()
        self.waiting: collections.deque[Request] = collections.deque()
        self.slots: list[Request | None] = [None] * runner.max_slots
        # What each idle slot's cache holds (token ids of its valid positions), for reuse.
        self.prefix_cache = prefix_cache
        self.slot_tokens: list[list[int]] = [[] for _ in range(runner.max_slots)]
        self.metrics = SchedulerMetrics()
        # Prompt tokens prefilled per step (default: one full chunk).
        self.prefill_budget = prefill_budget or runner.max_prefill_chunk
        # Embedding tokens per step (a row longer than this is one chunk of its own), and the
        # share of scheduler time embeddings may take while requests generate.
        self.embed_budget = embed_budget or self.prefill_budget
        self.embed_share = embed_share
        self.embeddings: collections.deque[EmbedJob] = collections.deque()
        self._embed_debt = 0.0  # seconds of other work owed before the next embedding chunk
        # Called in the middle of a step whenever requests have new deltas (`SchedulerLoop` sets
        # it to hand them to their callers); the end of each step is the caller's to handle.
        self.deliver: Callable[[], None] | None = None
        self._admissions = itertools.count()
        self._pending: tuple[object, list[tuple[int, Request]]] | None = None
        self._ids = itertools.count()
        self.grammars = GrammarCompiler(tokenizer, runner.cfg.vocab_size)
        self._masks = np.full((runner.max_slots, self.grammars.words), -1, np.int32)

    def warmup(self, progress: bool = False) -> None:
        """Compile every step shape now, so no request pays for a compile later."""
        self.state = self.runner.warmup(self.state, progress=progress)

    # -- requests ------------------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        rules: StopRules,
        *,
        grammar: Grammar | None = None,
        request_id: str | None = None,
        client: str | None = None,
    ) -> Request:
        """Validate and queue a request (single-threaded use; `SchedulerLoop` has its own submit)."""
        req = self.make_request(
            prompt_ids, params, rules, grammar=grammar, request_id=request_id, client=client
        )
        self.check_room(1, req.client)
        self.enqueue(req)
        return req

    def check_room(self, n: int, client: str | None, posted: int = 0, posted_by_client: int = 0) -> None:
        """Raise `OverloadedError` unless `n` more requests of `client` fit in the queue (with
        `posted` requests on their way to it, `posted_by_client` of them the client's)."""
        if posted + len(self.waiting) + n > self.max_queue:
            raise OverloadedError(f"the waiting queue is full ({self.max_queue} requests)")
        if (
            client is not None
            and posted_by_client + self.queued_by_client[client] + n > self.max_queue_per_client
        ):
            raise OverloadedError(
                f"you have too many requests waiting (at most {self.max_queue_per_client} per client)"
            )

    def enqueue(self, req: Request) -> None:
        """Queue a request made by `make_request` (scheduler thread only)."""
        self.metrics.requests_submitted += 1
        self.waiting.append(req)
        if req.client is not None:
            self.queued_by_client[req.client] += 1

    def _unqueue(self, req: Request) -> None:
        """`req` left the waiting queue (admitted or cancelled)."""
        if req.client is not None:
            self.queued_by_client[req.client] -= 1
            if self.queued_by_client[req.client] <= 0:
                del self.queued_by_client[req.client]  # the counter stays as small as the queue

    def make_request(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        rules: StopRules,
        *,
        grammar: Grammar | None = None,
        request_id: str | None = None,
        client: str | None = None,
    ) -> Request:
        """A validated request, not yet queued. Touches no scheduler state: safe from any thread."""
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab = self.runner.cfg.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        need = len(prompt_ids) + rules.max_tokens
        if need > self.max_seq_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_seq_len} tokens. However, you requested "
                f"{need} tokens ({len(prompt_ids)} in the prompt, {rules.max_tokens} for the completion). "
                "Please reduce the prompt or max_tokens.",
                param="messages",
            )
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        row = SlotSampling.from_params([params], [seed])  # on the caller's thread, once
        req = Request(
            prompt_ids, params, rules, seed, request_id or f"req-{next(self._ids)}", row, client=client
        )
        req.detok = IncrementalDetokenizer(self.tokenizer)
        req.stops = StopMatcher(rules.stop)
        if grammar is not None:
            req.matcher = self.grammars.matcher(grammar)
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request; its slot is free for the next step."""
        if req.finished:
            return
        if req in self.waiting:
            self.waiting.remove(req)
            self._unqueue(req)
        self._finish(req, "cancelled", emit=False)

    # -- embeddings ----------------------------------------------------------------------------

    def make_embedding(self, rows: Sequence[Sequence[int]]) -> EmbedJob:
        """An embeddings request for validated rows of token ids, not yet queued (any thread)."""
        rows = [list(r) for r in rows]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        return EmbedJob(rows, np.zeros((len(rows), self.runner.cfg.dim), np.float32), order)

    def enqueue_embedding(self, job: EmbedJob) -> None:
        """Queue an embeddings request (scheduler thread only); `job.finished` tells when it is done."""
        if not job.finished:
            self.embeddings.append(job)

    def cancel_embedding(self, job: EmbedJob) -> None:
        """Drop what is left of an embeddings request (scheduler thread only)."""
        job.cancelled = True
        if job in self.embeddings:
            self.embeddings.remove(job)

    def _embed_chunk(self) -> None:
        """Embed the next chunk of the oldest embeddings request: up to `EMBED_MAX_BATCH` rows
        and `embed_budget` tokens (at least one row). Requests take turns, chunk by chunk."""
        job = self.embeddings[0]
        rows = [job.rows[i] for i in job.order[job.done :]]
        n = 1
        while n < min(EMBED_MAX_BATCH, len(rows)) and (n + 1) * len(rows[n]) <= self.embed_budget:
            n += 1  # rows are shortest first: the (n+1)th is the chunk's longest
        idx = job.order[job.done : job.done + n]
        job.out[idx] = self.runner.embed(rows[:n], max_batch=EMBED_MAX_BATCH)
        job.done += n
        self.embeddings.popleft()
        if not job.finished:
            self.embeddings.append(job)

    @property
    def has_work(self) -> bool:
        return (
            bool(self.waiting)
            or any(r is not None for r in self.slots)
            or self._pending is not None
            or bool(self.embeddings)
        )

    @property
    def live_slots(self) -> int:
        return sum(r is not None for r in self.slots)

    def gauges(self) -> dict:
        """Queue length, live slots and the share of the KV cache holding live sequences."""
        live = [r for r in self.slots if r is not None]
        used = sum(r.prefilled + len(r.output_ids) for r in live)
        return {
            "queue_length": len(self.waiting),
            "live_slots": len(live),
            "max_slots": len(self.slots),
            "kv_cache_usage": used / (len(self.slots) * self.max_seq_len),
        }

    # -- the loop ------------------------------------------------------------------------------

    def step(self) -> None:
        """Admit, prefill one chunk per admitting request, decode once, process last step's
        tokens, and embed one chunk when embeddings are owed their share of the time."""
        t0 = time.perf_counter()
        self._generate()
        generating = any(r is not None for r in self.slots)
        if self.embeddings and (not generating or self._embed_debt <= 0):
            self._notify()  # this step's tokens leave before the chunk, not after it
            t1 = time.perf_counter()
            self._embed_chunk()
            if generating:  # `embed_share` of the time for embeddings, the rest for streams
                self._embed_debt += (time.perf_counter() - t1) * (1 - self.embed_share) / self.embed_share
        else:
            self._embed_debt = max(0.0, self._embed_debt - (time.perf_counter() - t0))

    def _generate(self) -> None:
        self._admit()
        admitting = sorted(
            ((s, r) for s, r in enumerate(self.slots) if r is not None and r.prefilled < len(r.prompt_ids)),
            key=lambda sr: sr[1].admitted_at,
        )
        budget = self.prefill_budget
        streaming = any(r is not None and r.output_ids for r in self.slots)
        for slot, req in admitting:
            if budget <= 0:
                break
            if req.finished:  # cancelled by `deliver` (its consumer failed) earlier in this step
                continue
            if streaming and not self._compiled_for(req):
                continue  # running streams go on while its steps compile on the worker
            if req.shared is not None and not self._take_shared(req):
                continue  # its source has not prefilled the shared tokens yet
            budget -= self._prefill_chunk(slot, req)
        decoding = [
            (s, r)
            for s, r in enumerate(self.slots)
            if r is not None and r.prefilled == len(r.prompt_ids) and r.output_ids
        ]
        previous, self._pending = self._pending, None
        if previous is not None and any(r.matcher is not None for _, r in decoding):
            self._process(*previous)  # the masks need the tokens just sampled
            previous = None
            decoding = [(s, r) for s, r in decoding if not r.finished]
        if decoding:
            active = np.zeros(self.runner.max_slots, bool)
            active[[s for s, _ in decoding]] = True
            longest = max(len(r.prompt_ids) + len(r.output_ids) for _, r in decoding)
            # The previous step is still unprocessed: its token is in the cache too.
            longest += previous is not None
            mask = self._step_masks(decoding)
            self.state, out = self.runner.decode(self.state, active, min(longest, self.max_seq_len), mask)
            out.copy_to_host_async()
            self._pending = (out, decoding)
        if previous is not None:
            self._process(*previous)

    def _step_masks(self, decoding: list[tuple[int, Request]]) -> np.ndarray | None:
        """Allowed-token bitmasks [max_slots, W] for a decode step, None when nothing is constrained."""
        constrained = [(r.matcher, s) for s, r in decoding if r.matcher is not None]
        if not constrained:
            return None
        t0 = time.perf_counter()
        self._masks.fill(-1)
        self.grammars.mask_batch(constrained, self._masks)
        for s, r in decoding:
            if r.matcher is not None:
                self._close_in_time(r, self._masks[s])
        self.metrics.grammar_mask_seconds += time.perf_counter() - t0
        self.metrics.constrained_tokens += len(constrained)
        return self._masks

    def _close_in_time(self, req: Request, mask: np.ndarray) -> None:
        """Budget-aware completion: when the tokens left are barely enough to complete the
        grammar (close the JSON), force the shortest completion found, one token per step, so
        constrained output is whole instead of cut off by max_tokens. A complete output that
        could go on (another tool call) ends when one more item might not fit."""
        left = min(req.rules.max_tokens, self.max_seq_len - len(req.prompt_ids)) - len(req.output_ids)
        m = req.matcher
        if m.accepting:
            if left > m.whole_cost + CLOSE_MARGIN:
                return
            path = [t for t in self.eos_ids if mask[t >> 5] >> (t & 31) & 1][:1]
        else:
            if left > CLOSE_WINDOW or len(req.output_ids) < req.close_retry_at:
                return
            path = m.closing_path(left, self.grammars.closers)
            if path is None:  # no way to finish in time found: look again later, less and less often
                req.close_retry_at = len(req.output_ids) + (CLOSE_RETRY << req.close_failures)
                req.close_failures += 1
                req.close_seen = None
                return
            # One sampled token can lengthen the way to finish by several tokens: a free token
            # is allowed while one more, lengthening it by as much as this request ever has in
            # one token (or by CLOSE_MARGIN + 1), still leaves room to finish.
            n = len(req.output_ids)
            if req.close_seen is not None and req.close_seen[0] == n - 1:
                req.close_growth = max(req.close_growth, len(path) - (req.close_seen[1] - 1))
            req.close_seen = (n, len(path))
            if len(path) + max(CLOSE_MARGIN, req.close_growth - 1) < left:
                return
        if not path:
            return
        mask.fill(0)
        mask[path[0] >> 5] = np.int32(np.uint32(1 << (path[0] & 31)).view(np.int32))

    def make_group(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        rules: StopRules,
        n: int,
        *,
        grammar: Grammar | None = None,
        request_id: str | None = None,
        client: str | None = None,
    ) -> list[Request]:
        """`n` samples of one prompt (OpenAI's `n`), queued together: the first is prefilled, and
        the others, sharing its whole prompt (`_admit`), copy its cache and prefill only the
        last prompt token. With a seed, sample i uses seed + i."""
        if n < 1:
            raise InvalidRequestError(f"n must be >= 1, got {n}", param="n")
        first = self.make_request(
            prompt_ids, params, rules, grammar=grammar, request_id=request_id, client=client
        )
        group = [first]
        for i in range(1, n):
            seed = None if params.seed is None else params.seed + i
            group.append(
                self.make_request(
                    prompt_ids,
                    dataclasses.replace(params, seed=seed),
                    rules,
                    grammar=grammar,
                    request_id=f"{first.id}-{i}",
                    client=client,
                )
            )
        return group

    def _admit(self) -> None:
        """Give waiting requests free slots, preferring the slot whose cache shares the longest
        prefix with the prompt; that prefix is reused and only the rest is prefilled. Where a
        live request's prompt (one admitted earlier, even in this same call) shares a longer
        prefix (`MIN_SHARED` tokens or the whole prompt), the request copies it from that slot
        instead (`shared`): a burst of requests with one system prompt, or n samples of one
        prompt, prefill it once."""
        while self.waiting and None in self.slots:
            req = self.waiting.popleft()
            self._unqueue(req)
            free = [s for s, r in enumerate(self.slots) if r is None]
            slot, reuse = free[0], 0
            # At least the last prompt token is prefilled: its logits give the first sample.
            most = len(req.prompt_ids) - 1
            if self.prefix_cache:
                slot, reuse = max(
                    ((s, _common_prefix(self.slot_tokens[s], req.prompt_ids)) for s in free),
                    key=lambda x: x[1],
                )
                reuse = min(reuse, most)
                live = (r for r in self.slots if r is not None and not r.finished)
                source, n = max(
                    ((r, _common_prefix(r.prompt_ids, req.prompt_ids)) for r in live),
                    key=lambda x: x[1],
                    default=(None, 0),
                )
                n = min(n, most)
                if n > reuse and n >= min(MIN_SHARED, most):
                    req.shared = (source, n)
            req.slot, req.prefilled, req.cached_tokens = slot, reuse, reuse
            req.admitted_at = next(self._admissions)
            self.slot_tokens[slot] = []
            self.slots[slot] = req
            self.metrics.prompt_tokens += len(req.prompt_ids)
            if reuse:
                self.metrics.prefix_cache_hits += 1
                self.metrics.cached_prompt_tokens += reuse

    def _take_shared(self, req: Request) -> bool:
        """Copy the prefix `req` shares with a live request from that one's slot, once it is
        prefilled there; False while it is not yet (the source is older, so its chunks come
        first). A source that is gone leaves `req` to prefill everything itself."""
        source, n = req.shared
        if source.finished or source.slot is None:
            req.shared = None
            return True
        if source.prefilled < n:
            return False
        self.state = self.runner.copy_slot(self.state, source.slot, req.slot, n)
        self.metrics.prefix_cache_hits += req.cached_tokens == 0  # else counted at admission
        self.metrics.cached_prompt_tokens += n - req.cached_tokens
        req.prefilled = req.cached_tokens = n
        req.shared = None
        return True

    def _compiled_for(self, req: Request) -> bool:
        """Whether the request's next steps (the copy of a shared prefix, its next chunk, and
        the decode step it joins after its last chunk) are compiled; the missing ones are
        asked of the compiler's worker first."""
        start = req.prefilled
        shapes = []
        if req.shared is not None:
            start = req.shared[1]
            shapes.append(self.runner.copy_shape(start))
        n = min(len(req.prompt_ids) - start, self.runner.max_prefill_chunk)
        shapes.append(self.runner.prefill_shape(n, start))
        if start + n == len(req.prompt_ids):
            live = [(s, r) for s, r in enumerate(self.slots) if r is not None]
            longest = max(len(r.prompt_ids) + len(r.output_ids) for _, r in live) + 1
            shapes.append(self.runner.decode_shape(live[-1][0] + 1, min(longest, self.max_seq_len)))
        missing = [s for s in shapes if not self.runner.compiler.ready(s)]
        if missing:
            self.runner.compiler.request(missing)
        return not missing

    def _prefill_chunk(self, slot: int, req: Request) -> int:
        """Prefill the request's next chunk; returns how many prompt tokens it took."""
        start = req.prefilled
        chunk = req.prompt_ids[start : start + self.runner.max_prefill_chunk]
        last = start + len(chunk) == len(req.prompt_ids)
        mask = None
        if last and req.matcher is not None:
            t0 = time.perf_counter()
            mask = req.matcher.mask()[None]
            self._close_in_time(req, mask[0])
            self.metrics.grammar_mask_seconds += time.perf_counter() - t0
            self.metrics.constrained_tokens += 1
        self.state, out = self.runner.prefill(
            self.state, np.asarray(chunk, np.int32), slot, start, req.row, mask
        )
        if self._pending is not None:
            # The device ran the previous decode step before this chunk: hand its tokens out
            # now rather than after this step's prefills.
            self._process(*self._pending)
            self._pending = None
            self._notify()
        req.prefilled += len(chunk)
        if req.prefilled == len(req.prompt_ids) and not req.finished:
            self._accept(req, _token(np.asarray(out), 0, req.params.top_logprobs))
            self._notify()
        return len(chunk)

    def _notify(self) -> None:
        if self.deliver is not None:
            self.deliver()

    def _process(self, out, decoding: list[tuple[int, Request]]) -> None:
        out = np.asarray(out)
        for slot, req in decoding:
            if not req.finished:
                self._accept(req, _token(out, slot, req.params.top_logprobs))

    def _accept(self, req: Request, tok: Token) -> None:
        token, logprob = tok.id, tok.logprob
        now = time.monotonic()
        (self.metrics.itl if req.output_ids else self.metrics.ttft).observe(now - req.last_event)
        req.last_event = now
        self.metrics.generated_tokens += 1
        req.output_ids.append(token)
        req.output_logprobs.append(logprob)
        rules = req.rules
        if req.matcher is not None and not req.matcher.advance(token):
            log.error("request %s: token %d broke its grammar: %s", req.id, token, req.matcher.error)
            self._finish(req, "stop", token=tok)
            return
        if (token in self.eos_ids and not rules.ignore_eos) or token in rules.stop_token_ids:
            self._finish(req, "stop", token=tok)
            return
        text = req.stops.feed(req.detok.add(token))
        if req.stops.stopped or (req.matcher is not None and req.matcher.done):
            self._emit(req, text, tok)
            self._finish(req, "stop")
            return
        if (
            len(req.output_ids) >= rules.max_tokens
            or len(req.prompt_ids) + len(req.output_ids) >= self.max_seq_len
        ):
            self._emit(req, text, tok)
            self._finish(req, "length")
            return
        self._emit(req, text, tok)

    def _emit(self, req: Request, text: str, tok: Token | None, finish: str | None = None) -> None:
        req.text += text
        ids, lps, tops = ((tok.id,), (tok.logprob,), (tok.top,) if tok.top else ()) if tok else ((), (), ())
        usage = Usage(len(req.prompt_ids), len(req.output_ids), req.cached_tokens) if finish else None
        req.deltas.append(Delta(text, ids, lps, finish, usage, tops))

    def _finish(self, req: Request, reason: str, token: Token | None = None, emit: bool = True) -> None:
        tail = ""
        if emit and not req.stops.stopped:
            tail = req.stops.feed(req.detok.flush()) + req.stops.flush()
        req.finish_reason = reason
        self.metrics.requests_finished[reason] = self.metrics.requests_finished.get(reason, 0) + 1
        if emit:
            self._emit(req, tail, token, reason)
        if req.slot is not None and self.slots[req.slot] is req:
            self.slots[req.slot] = None
            # Valid cache: the prefilled prompt and every generated token but the last, whose
            # K/V is only written by a decode step that may not have run.
            written = req.prompt_ids[: req.prefilled]
            if req.prefilled == len(req.prompt_ids):
                written = written + req.output_ids[:-1]
            self.slot_tokens[req.slot] = written
        req.slot = None


# The fewest prompt tokens worth copying from another slot rather than prefilling: a copy
# moves the cache's first positions, a context bucket's worth (>= 128), in about a
# millisecond on CPU for the default model, about what prefilling one or two tokens costs.
MIN_SHARED = 4


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share: 64 at a time (a slice compare runs in C), then
    one at a time. Admission compares a prompt with every slot's tokens."""
    n = min(len(a), len(b))
    i = 0
    while i + 64 <= n and a[i : i + 64] == b[i : i + 64]:
        i += 64
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _token(out: np.ndarray, row: int, n_top: int) -> Token:
    """Row `row` of a packed step output, with its `n_top` best alternatives."""
    tokens, logprobs = unpack(out[row : row + 1])
    top: tuple[tuple[int, float], ...] = ()
    if n_top:
        ids, lps = unpack_top(out[row : row + 1])
        top = tuple(zip(ids[0, :n_top].tolist(), lps[0, :n_top].tolist(), strict=True))
    return Token(int(tokens[0]), float(logprobs[0]), top)

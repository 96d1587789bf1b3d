"""`Generator`: the importable API for notebooks and scripts.

    from llama_jax import Generator, SamplingParams
    gen = Generator.from_pretrained()                 # the default model
    gen.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0), max_tokens=64).text

It owns one loaded model, its tokenizer and chat template, and one `Scheduler` run by a
`SchedulerLoop` thread; every call (sync or async, from any thread) goes through it, so
concurrent calls and batch generation share the slots by continuous batching. It is the
only door of the HTTP server (`serve/`): what a server needs of the scheduler (n-sample
groups, cancelling, health, gauges) is a member here, so nothing reaches under it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from llama_jax import lockstep
from llama_jax.chat_template import ChatTemplate
from llama_jax.compiler import WARMUP_MODES
from llama_jax.constrain import Grammar
from llama_jax.errors import ContextLengthError, InvalidRequestError
from llama_jax.reasoning import Markers, ReasoningStream, opens_in_prompt, template_markers
from llama_jax.runner import ModelRunner
from llama_jax.sampling import SamplingParams
from llama_jax.scheduler import Delta, Request, Scheduler, Usage
from llama_jax.scheduler_loop import SchedulerLoop
from llama_jax.sharding import describe, make_mesh
from llama_jax.stopping import DEFAULT_MAX_TOKENS, StopRules
from llama_jax.tokenizer import Tokenizer
from llama_jax.tools import (
    ToolCall,
    ToolCallStream,
    builtin_messages,
    check_tools,
    chosen_tools,
    template_knows_tools,
    template_messages,
    tool_grammar,
)
from llama_jax.weights import LoadedModel, LoadOptions, load_model
from llama_jax.xla_cache import enable_compilation_cache

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[float]
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class PreparedChat:
    """A chat request made ready for the scheduler: its prompt ids, the grammar its output must
    follow (from a forced tool choice, `response_format` or a grammar of the caller's), and
    how to read calls and reasoning out of it."""

    prompt_ids: list[int]
    grammar: Grammar | None
    tool_mode: str  # "none", "auto" or "required"
    tool_names: frozenset[str]  # the tools the output may call
    markers: Markers = ("<think>", "</think>")  # the template's reasoning markers
    thinking: bool = False  # the prompt ends inside a reasoning block

    def tool_stream(self) -> ToolCallStream | None:
        """A parser of calls in the output; None when calls are off."""
        return None if self.tool_mode == "none" else ToolCallStream(set(self.tool_names))

    def reasoning_stream(self) -> ReasoningStream:
        """A splitter of the output's reasoning block from its answer (`llama_jax.reasoning`)."""
        return ReasoningStream(self.markers, self.thinking)


@dataclasses.dataclass(frozen=True)
class SlotInfo:
    """A busy slot: its request's id and token counts."""

    request_id: str
    prompt_tokens: int
    generated_tokens: int


class Generator:
    def __init__(
        self,
        loaded: LoadedModel,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        max_slots: int = 8,
        max_seq_len: int = 2048,
        max_queue: int = 256,
        kv_dtype: str | None = "auto",
    ):
        self.loaded = loaded
        self.config = loaded.config
        self.model = loaded.model
        self.tokenizer = tokenizer
        self.template = template
        self.max_seq_len = max_seq_len
        # Several processes (jax.distributed): process 0's device calls are broadcast to the rest.
        self.runner = lockstep.for_process(
            ModelRunner(
                loaded.model,
                max_slots=max_slots,
                max_seq_len=max_seq_len,
                mesh=loaded.mesh,
                kv_dtype=kv_dtype,
            )
        )
        self.scheduler = Scheduler(self.runner, tokenizer, eos_ids=loaded.config.eos_ids, max_queue=max_queue)
        self._loop: SchedulerLoop | None = None

    @property
    def loop(self) -> SchedulerLoop:
        """The scheduler thread, started on first use."""
        if self._loop is None:
            self._loop = SchedulerLoop(self.scheduler).start()
        return self._loop

    def close(self) -> None:
        """Stop the scheduler thread (requests still running are cancelled)."""
        self.runner.compiler.close()
        if self._loop is not None:
            self._loop.close()

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike | None = None,
        options: LoadOptions | None = None,
        *,
        max_queue: int = 256,
        compilation_cache: str | None = "default",
        **fields,
    ) -> Generator:
        """Load an alias (default: smollm2-135m-instruct), a GGUF file, a Hugging Face folder or
        a Hugging Face model id: "org/name" (a model folder), "org/name:Q4_K_M" (that GGUF file
        of a GGUF repository), from the local cache or downloaded (`huggingface_hub`, the `hf`
        extra; `HF_HUB_OFFLINE=1` is respected) at `revision` (branch, tag or commit).

        The load options are `LoadOptions`' fields, given as `options` or as keywords (over
        `options`): `quantize="auto"` keeps the file's precision: a Q4 GGUF's weights stay 4-bit
        (groups of 32 with scales and mins), Q5-Q8 become int8, 16/32-bit floats `dtype`; "none"
        loads float weights, "int8" int8 with per-channel scales, "q4" 4-bit. `max_seq_len`
        (tokens per sequence) and `max_slots` (sequences decoded together) fix the KV cache's
        size; `chat_template` overrides the model's (a builtin name or Jinja source).
        `dtype="auto"`: float32 on CPU, bfloat16 on GPU/TPU. `mesh="data=D,model=M"` (or a
        `jax.sharding.Mesh`) runs tensor-parallel over M devices with D replicas of the slot
        batch (`max_slots` a multiple of D); None: one device. `kernels`: the hand-written CPU
        decode kernels (`cpu_kernels.py`); None uses them on the CPU backend when they build
        (`LLAMA_JAX_CPU_KERNELS=0` turns them off). `kv_dtype`: the KV cache's element type;
        "auto" is float16 where the CPU kernels serve (as llama.cpp's cache), else `dtype`.
        `max_queue`: requests waiting for a slot before submits are refused;
        `compilation_cache`: the persistent XLA cache's folder ("default": llama-jax's).
        """
        opts = LoadOptions.of(options, **fields)
        if compilation_cache:
            enable_compilation_cache(None if compilation_cache == "default" else compilation_cache)
        mesh = make_mesh(opts.mesh)
        log.info("%s", describe(mesh))
        loaded = load_model(model, opts, mesh=mesh)
        kind, source = loaded.tokenizer_source
        if kind == "gguf":
            tokenizer = Tokenizer.from_gguf_metadata(source, loaded.path)
        else:
            tokenizer = Tokenizer.from_hf_folder(source)
        template = ChatTemplate.resolve(tokenizer.chat_template, opts.chat_template)
        return cls(
            loaded,
            tokenizer,
            template,
            max_slots=opts.max_slots,
            max_seq_len=min(opts.max_seq_len, loaded.config.context_length),
            max_queue=max_queue,
            kv_dtype=opts.kv_dtype,
        )

    def warmup(self, progress: bool | None = None, mode: str = "full") -> None:
        """Compile (or load from the compilation cache) the step shapes requests will need.

        "full": every prefill and decode shape, now. "first": what a first short request needs
        now (a few seconds), the rest on a worker thread in the order requests are likely to
        need them (`compile_status()` counts them; a request whose shape is still compiling
        waits for it while running streams go on). "none": each shape when first needed.
        With several processes (`jax.distributed`), "first" is "full": every process must
        compile the same steps."""
        if mode not in WARMUP_MODES:
            raise ValueError(f"warm-up mode must be one of {', '.join(WARMUP_MODES)}, got {mode!r}")
        show = sys.stderr.isatty() if progress is None else progress
        if mode == "full" or (mode == "first" and jax.process_count() > 1):
            self.loop.call(lambda: self.scheduler.warmup(progress=show))
        elif mode == "first":
            self.runner.compiler.compile_all(self.runner.first_shapes(), progress=show)
            self.runner.compiler.plan(self.runner.warmup_shapes())

    def compile_status(self) -> dict:
        """{"compiled", "pending", "compiling"}: step shapes compiled, still to compile (planned
        by a "first" warm-up, or waited for by a request), and the one compiling now."""
        return self.runner.compiler.status()

    # -- for a server: the scheduler's limits, requests, health and gauges ----------------------

    @property
    def eos_ids(self) -> frozenset[int]:
        """The token ids that end a turn (the model's and the tokenizer's)."""
        return self.scheduler.eos_ids

    @property
    def max_slots(self) -> int:
        """Sequences decoded together."""
        return self.runner.max_slots

    @property
    def client_queue(self) -> int:
        """The most requests one client may have waiting."""
        return min(self.scheduler.max_queue, self.scheduler.max_queue_per_client)

    def submit_group(
        self,
        prompt_ids: Sequence[int],
        sampling: SamplingParams,
        rules: StopRules,
        sinks: Sequence[Callable[[Delta | BaseException], None]],
        *,
        grammar: Grammar | None = None,
        client: str | None = None,
    ) -> list[Request]:
        """`len(sinks)` samples of one prompt sharing one prefill (OpenAI's `n`). Each sink
        receives its sample's deltas, or the exception that ended it, on the scheduler thread.
        A bad request or a full queue raises here, before any device work; `client` (a key, an
        address) is held to its share of the queue. Cancel what is not read to its end."""
        return self.loop.submit_group(prompt_ids, sampling, rules, sinks, grammar=grammar, client=client)

    def cancel(self, request: Request) -> None:
        """Stop a request of `submit_group` and free its slot (no-op once it has finished)."""
        self.loop.cancel(request)

    @property
    def healthy(self) -> bool:
        """The scheduler thread runs (started here if it was not) and has not failed."""
        return self.loop.error is None and self.loop.running

    @property
    def failure(self) -> BaseException | None:
        """What stopped the scheduler thread; None while it runs or after a stop on purpose."""
        return self.loop.error

    def stalled_for(self) -> float:
        """Seconds the scheduler has had work without finishing a step (0: it is keeping up)."""
        return self.loop.stalled_for()

    @property
    def busy(self) -> bool:
        """Requests are running or waiting."""
        return bool(self.scheduler.live_slots or self.scheduler.waiting or self.loop.backlog)

    def metrics(self) -> dict:
        """The scheduler's counters and latency histograms (`SchedulerMetrics.snapshot`)."""
        return self.scheduler.metrics.snapshot()

    def gauges(self) -> dict:
        """{"queue_length", "live_slots", "max_slots", "kv_cache_usage"} now; the queue counts
        requests posted to the scheduler thread and not yet taken."""
        g = self.scheduler.gauges()
        g["queue_length"] += self.loop.backlog
        return g

    def slots(self) -> list[SlotInfo | None]:
        """What each slot holds now (None: free)."""
        return [
            None if r is None else SlotInfo(r.id, len(r.prompt_ids), len(r.output_ids))
            for r in list(self.scheduler.slots)
        ]

    def follow(self) -> None:
        """On a process other than 0 of a multi-process mesh: replay process 0's device steps
        for as long as the process runs (`lockstep.follow`)."""
        lockstep.follow(self.scheduler)

    # -- prompts ------------------------------------------------------------------------------

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text. Tools (OpenAI function tools) go to a template that knows them, and
        otherwise into a system message in the built-in format (`llama_jax.tools`).
        `template_kwargs` are extra template variables (Qwen3's `enable_thinking`)."""
        tools = check_tools(tools) or None
        if template_knows_tools(self.template.source):
            messages = template_messages(messages)
        else:
            messages, tools = builtin_messages(messages, tools or []), None
        return self.template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            bos_token=self.tokenizer.bos_token,
            eos_token=self.tokenizer.eos_token,
            special_tokens=self.tokenizer.special_tokens,
            template_kwargs=template_kwargs,
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        # The template writes BOS itself where the model wants one.
        return self.tokenizer.encode(self.render_chat(messages, tools=tools), add_bos=False)

    def prepare_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        parallel_tool_calls: bool = True,
        grammar: Grammar | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> PreparedChat:
        """Validate the tools and output format of a chat and render its prompt. With
        `tool_choice` "required" or a named function the output is constrained to calls of the
        allowed tools; with "auto" the model may answer or call (calls are parsed); with "none"
        the tools stay in the prompt but the output is plain content. `grammar` constrains the
        output like `response_format` (one of the two)."""
        checked = check_tools(tools)
        mode, allowed = chosen_tools(checked, tool_choice)
        formatted = Grammar.from_response_format(response_format)
        if grammar is not None and formatted is not None:
            raise InvalidRequestError(
                f"response_format and {grammar.param or 'grammar'} both constrain the output: give one",
                param=grammar.param or "grammar",
            )
        grammar = grammar or formatted
        if mode == "required":
            if grammar is not None and grammar is not formatted:
                raise InvalidRequestError(
                    f"a required tool call and {grammar.param or 'grammar'} both constrain the output",
                    param="tool_choice",
                )
            grammar = tool_grammar(allowed, parallel_tool_calls)
        if grammar is not None:
            self.scheduler.grammars.matcher(grammar)  # an invalid schema fails here, before any work
        # "none" keeps the tools in view, as OpenAI does; the template writes BOS itself.
        prompt = self.render_chat(messages, tools=checked, template_kwargs=template_kwargs)
        ids = self.tokenizer.encode(prompt, add_bos=False)
        names = frozenset(t["function"]["name"] for t in allowed) if mode != "none" else frozenset()
        markers = template_markers(self.template.source)
        return PreparedChat(ids, grammar, mode, names, markers, opens_in_prompt(prompt, markers))

    def check_grammar(self, grammar: Grammar) -> None:
        """Compile `grammar` (cached for the request that follows): an invalid or too costly one
        is an `InvalidRequestError` here, before any device work. Slow: call it off the event loop."""
        self.scheduler.grammars.matcher(grammar)

    def _ids(self, prompt: str | Sequence[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    # -- generation ---------------------------------------------------------------------------

    @staticmethod
    def _completion(r: Request) -> Completion:
        return Completion(
            r.text,
            list(r.output_ids),
            r.finish_reason or "stop",
            Usage(len(r.prompt_ids), len(r.output_ids), r.cached_tokens),
            list(r.output_logprobs),
        )

    # Every generation call takes the request's sampling (`SamplingParams`, default: its fields'
    # defaults), when it stops (`StopRules`' fields as keywords: at most `max_tokens` tokens,
    # `stop` strings left out of the text, `stop_token_ids`, `ignore_eos`) and a `grammar` its
    # output must match.

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        sampling: SamplingParams | None = None,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        stop: str | Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        grammar: Grammar | None = None,
    ) -> list[Completion]:
        """Complete each prompt (text, or token ids); all are batched over the scheduler's slots."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        sampling = sampling or SamplingParams()
        rules = StopRules(max_tokens, stop, stop_token_ids, ignore_eos)
        done = [threading.Event() for _ in prompts]
        errors: list[BaseException] = []
        requests: list[Request] = []

        def sink(i: int):
            def on(item: Delta | BaseException) -> None:
                if isinstance(item, BaseException):
                    errors.append(item)
                    done[i].set()
                elif item.finish_reason is not None:
                    done[i].set()

            return on

        try:
            for i, p in enumerate(prompts):
                requests.append(self.loop.submit(self._ids(p), sampling, rules, sink(i), grammar=grammar))
            for event in done[: len(requests)]:
                event.wait()
        finally:
            for r in requests:
                self.loop.cancel(r)
        if errors:
            raise errors[0]
        return [self._completion(r) for r in requests]

    def stream(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingParams | None = None,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        stop: str | Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        grammar: Grammar | None = None,
    ) -> Iterator[str]:
        """Yield the completion's text as it is generated (never half a UTF-8 character)."""
        rules = StopRules(max_tokens, stop, stop_token_ids, ignore_eos)
        for delta in self.loop.stream(
            self._ids(prompt), sampling or SamplingParams(), rules, grammar=grammar
        ):
            if delta.text:
                yield delta.text

    async def astream(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingParams | None = None,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        stop: str | Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        grammar: Grammar | None = None,
    ) -> AsyncIterator[Delta]:
        """Deltas (text, token ids, logprobs; the last has finish_reason and usage) as generated.
        Closing the iterator, or cancelling the task consuming it, cancels the request."""
        rules = StopRules(max_tokens, stop, stop_token_ids, ignore_eos)
        ids = self._ids(prompt)
        async for delta in self.loop.astream(ids, sampling or SamplingParams(), rules, grammar=grammar):
            yield delta

    async def agenerate(
        self,
        prompts: Sequence[str | Sequence[int]],
        sampling: SamplingParams | None = None,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        stop: str | Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        grammar: Grammar | None = None,
    ) -> list[Completion]:
        """Complete several prompts concurrently from asyncio code."""
        StopRules(max_tokens, stop, stop_token_ids, ignore_eos)  # a bad value fails before any prompt runs

        async def one(p) -> Completion:
            parts, ids, lps, last = [], [], [], None
            async for d in self.astream(
                p,
                sampling,
                max_tokens=max_tokens,
                stop=stop,
                stop_token_ids=stop_token_ids,
                ignore_eos=ignore_eos,
                grammar=grammar,
            ):
                parts.append(d.text)
                ids += d.token_ids
                lps += d.logprobs
                last = d
            return Completion("".join(parts), ids, last.finish_reason, last.usage, lps)

        return list(await asyncio.gather(*(one(p) for p in prompts)))

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        sampling: SamplingParams | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        parallel_tool_calls: bool = True,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        stop: str | Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        grammar: Grammar | None = None,
    ) -> Completion:
        """One assistant turn. With `tools`, calls the model makes are in `tool_calls` (and
        `finish_reason` is "tool_calls"); `response_format` (OpenAI's json_object /
        json_schema) or `grammar` constrains the text."""
        prep = self.prepare_chat(
            messages,
            tools=tools,
            tool_choice=tool_choice,
            response_format=response_format,
            parallel_tool_calls=parallel_tool_calls,
            grammar=grammar,
        )
        out = self.generate(
            [prep.prompt_ids],
            sampling,
            max_tokens=max_tokens,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            grammar=prep.grammar,
        )[0]
        parser = prep.tool_stream()
        if parser is None:
            return out
        parser.feed(out.text)
        parser.finish()
        if not parser.calls:
            return out
        reason = "tool_calls" if out.finish_reason == "stop" else out.finish_reason
        return dataclasses.replace(out, text=parser.content, finish_reason=reason, tool_calls=parser.calls)

    def chat_stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        sampling: SamplingParams | None = None,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        stop: str | Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        grammar: Grammar | None = None,
    ) -> Iterator[str]:
        return self.stream(
            self.encode_chat(messages),
            sampling,
            max_tokens=max_tokens,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            grammar=grammar,
        )

    def embed(self, inputs: str | Sequence[int] | Sequence[str | Sequence[int]]) -> np.ndarray:
        """Mean-pooled final hidden states, L2-normalized: float32 [len(inputs), D].
        Each input is a text or a list of token ids."""
        return self.loop.embed(self.embedding_rows(inputs))

    async def aembed(self, inputs: str | Sequence[int] | Sequence[str | Sequence[int]]) -> np.ndarray:
        """`embed` for asyncio code: the event loop keeps running while the device works, and
        cancelling the awaiting task stops the work after its current chunk."""
        return await self.loop.aembed(self.embedding_rows(inputs))

    def embedding_rows(self, inputs: str | Sequence[int] | Sequence[str | Sequence[int]]) -> list[list[int]]:
        """Validated token ids of each input (texts are encoded without BOS)."""
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not inputs:
            raise InvalidRequestError("input must not be empty", param="input")
        vocab = self.config.vocab_size
        rows = []
        for i, item in enumerate(inputs):
            r = (
                self.tokenizer.encode(item, add_bos=False)
                if isinstance(item, str)
                else [int(t) for t in item]
            )
            if not r:
                raise InvalidRequestError(f"input {i} is empty", param="input")
            if min(r) < 0 or max(r) >= vocab:
                raise InvalidRequestError(f"input {i}: token ids must be in [0, {vocab})", param="input")
            if len(r) > self.max_seq_len:
                raise ContextLengthError(
                    f"input {i} has {len(r)} tokens, more than the maximum of {self.max_seq_len}",
                    param="input",
                )
            rows.append(r)
        return rows
